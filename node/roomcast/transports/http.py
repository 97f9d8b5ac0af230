"""Plain HTTP on the client port, answered in ``process_request`` before any upgrade.

Routes (GET only): ``/`` (the demo page, with the browser library inlined; the tutorial
dialect's WebSocket when it is an upgrade), ``/roomcast.js`` and ``/roomcast.d.ts`` (the browser
library, clients/js), ``/healthz``, ``/readyz``, and, unless ``--public-rest false``,
``/api/stats`` and ``/api/rooms/{room}/members``. Metrics, admin and the server API are on the
internal port (transports/api.py). WebSocket upgrades go through ``WebSocketEndpoint.handshake``
(transports/handshake.py lists every refusal and its status); a request the WebSocket library
could not take is answered before it gets there (``handshake.screen_head``).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any, Protocol, runtime_checkable

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from roomcast import clock
from roomcast.backends.broker import BrokerUnavailable
from roomcast.config import Config
from roomcast.metrics import Metrics
from roomcast.protocol import envelopes
from roomcast.service.service import Service
from roomcast.transports.handshake import (
    ALLOW_GET,
    Refusal,
    response,
    split_target,
    text_response,
)
from roomcast.transports.websocket import WebSocketEndpoint

#: Seconds an answer of the public REST endpoints is reused: a flood of them costs one
#: presence read a second per path.
PUBLIC_CACHE_SECONDS = 1.0
#: Paths whose answers are kept at once (beyond it the cache starts over).
PUBLIC_CACHE_ENTRIES = 1024
#: Most members one /api/rooms/{room}/members answer lists (``truncated`` says there are more).
PUBLIC_MEMBERS = 100


def refusal_response(refusal: Refusal) -> Response:
    return text_response(refusal.status, refusal.text, refusal.headers)


def json_response(status: int, value: Any) -> Response:
    return response(status, orjson.dumps(value), "application/json")


class Lifecycle(Protocol):
    """What the routes need of the node that owns them (app.Node)."""

    @property
    def accepting(self) -> bool:
        """False once a drain or shutdown began: readiness and handshakes answer 503."""

    def request_drain(self) -> None:
        """Begin a drain; later calls are harmless."""


@runtime_checkable
class BackendHealth(Protocol):
    """What the routes need of the health of the backend behind the broker (a Redis broker's
    ``health``, backends/redis_common.RedisHealth; a memory broker has none)."""

    def problem(self) -> str | None:
        """None while the backend is reachable and accepts writes; otherwise why not, one word
        (unreachable, timeout, oom, readonly, misconf, error)."""

    def errors(self) -> Mapping[str, int]:
        """Failures seen since start, by kind."""


class HttpRoutes:
    def __init__(
        self, config: Config, service: Service, metrics: Metrics, lifecycle: Lifecycle,
        websocket: WebSocketEndpoint,
    ) -> None:
        self.config = config
        self.websocket = websocket
        self.service = service
        self.metrics = metrics
        self.lifecycle = lifecycle
        #: The Redis behind the broker (None in embedded mode): readiness and its error metric.
        health = getattr(service.broker, "health", None)
        self._backend = health if isinstance(health, BackendHealth) else None
        if self._backend is not None:
            metrics.watch_redis_errors(self._backend.errors)
        static = resources.files("roomcast.transports").joinpath("static")
        #: The browser client library (a copy of clients/js/) and its types.
        self._assets = {
            "/roomcast.js": (static.joinpath("roomcast.js").read_bytes(),
                             "text/javascript; charset=utf-8"),
            "/roomcast.d.ts": (static.joinpath("roomcast.d.ts").read_bytes(),
                               "application/typescript; charset=utf-8"),
        }
        # The demo page gets the library inlined in place of its import: one self-contained
        # answer, which works behind a proxy that forwards only `/` of these paths.
        self._page = static.joinpath("index.html").read_bytes().replace(
            b'import { Roomcast } from "./roomcast.js";', self._assets["/roomcast.js"][0], 1)
        #: path -> (monotonic expiry, answer) of the public REST endpoints.
        self._cache: dict[str, tuple[float, int, bytes]] = {}

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Answer plain HTTP; return None to let a WebSocket handshake proceed."""
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                refusal = await self.websocket.handshake(connection, request,
                                                         self.lifecycle.accepting)
                return None if refusal is None else refusal_response(refusal)
            return await self.route(request)
        except BrokerUnavailable:
            return json_response(503, {"error": "the cluster backend is unavailable"})

    async def route(self, request: Request) -> Response | None:
        path = split_target(request.path)[0]
        if request.method != "GET":
            self.metrics.http_refused.labels(status="405").inc()
            return text_response(405, "only GET is served on this port (the server API is on "
                                 "the internal port)", ALLOW_GET)
        if path == "/":
            return response(200, self._page, "text/html; charset=utf-8")
        if path in self._assets:
            body, content_type = self._assets[path]
            # A page of another origin imports a module script with CORS.
            return response(200, body, content_type, (("Access-Control-Allow-Origin", "*"),))
        if path == "/healthz":
            return self.healthz()
        if path == "/readyz":
            return self.readyz()
        if self.config.public_rest and (path == "/api/stats" or (
                path.startswith("/api/rooms/") and path.endswith("/members"))):
            return await self.public_rest(path)
        # Metrics and admin live on the internal port only (transports/api.py): nothing
        # administrative is reachable here, whatever the path looks like.
        return text_response(404, "not found")

    async def public_rest(self, path: str) -> Response:
        """The FastAPI tutorial's two REST endpoints, cheap and bounded: each answer is kept
        for PUBLIC_CACHE_SECONDS, a room's members are capped at PUBLIC_MEMBERS (distinct
        users, without connection or node ids), and only rooms whose presence is public are
        shown (Service.public_presence)."""
        now = clock.monotonic()
        cached = self._cache.get(path)
        if cached is None or cached[0] <= now:
            if path == "/api/stats":
                status, body = 200, await self.service.stats(public_only=True)
            else:
                status, body = await self.room_members(path[len("/api/rooms/"):-len("/members")])
            if len(self._cache) >= PUBLIC_CACHE_ENTRIES:
                self._cache.clear()
            cached = self._cache[path] = (now + PUBLIC_CACHE_SECONDS, status, orjson.dumps(body))
        # A new Response each time: the library adds its Server header to the one it sends.
        return response(cached[1], cached[2], "application/json")

    async def room_members(self, room: str) -> tuple[int, dict[str, Any]]:
        if not envelopes.valid_room(room):
            return 404, {"error": "invalid room name"}
        if not self.service.public_presence(room):
            # Only rooms anyone may join show who is in them here (docs/PROTOCOL.md).
            return 403, {"error": "this room's presence is not public"}
        users: dict[str, dict[str, Any]] = {}
        for member in await self.service.members(room):
            entry = {"user_id": member.user_id, "username": member.username}
            if member.info is not None:
                entry["info"] = member.info
            users.setdefault(member.user_id, entry)
        shown = list(users.values())[:PUBLIC_MEMBERS]
        body: dict[str, Any] = {"room": room, "members": shown, "count": len(users)}
        if len(users) > len(shown):
            body["truncated"] = True
        return 200, body

    def healthz(self) -> Response:
        """Liveness: 200 whenever the process serves HTTP, whatever Redis does (a restart would
        not bring Redis back); ``broker`` and, in cluster mode, ``redis`` say how it is."""
        body: dict[str, Any] = {"status": "ok", "node_id": self.config.node_id,
                                "broker": self.service.broker.available}
        if self._backend is not None:
            body["redis"] = self._backend.problem() or "ok"
        return json_response(200, body)

    def readyz(self) -> Response:
        return json_response(*self.readiness())

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """Readiness: 503 ``draining`` from the start of a drain; 503 ``unavailable`` with the
        reason while Redis is unreachable or refuses writes (``redis``: unreachable, timeout,
        oom, readonly, misconf, error), from the write probe and the failures requests saw;
        otherwise 200 ``ready``. The same on both ports."""
        if not self.lifecycle.accepting:
            return 503, {"status": "draining"}
        problem = self._backend.problem() if self._backend is not None else None
        if problem is not None:
            return 503, {"status": "unavailable", "redis": problem}
        return 200, {"status": "ready"}
