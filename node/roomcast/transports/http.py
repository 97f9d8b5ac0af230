"""Plain HTTP on the WebSocket port, answered in ``process_request`` before any upgrade.

Routes: ``/`` (test page; the tutorial dialect's WebSocket when it is an upgrade), ``/healthz``,
``/readyz``, ``/metrics``, ``/api/stats``, ``/api/rooms/{room}/members``, and ``/admin/drain``.
WebSocket upgrades go through ``WebSocketEndpoint.handshake`` (transports/handshake.py lists
every refusal and its status).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from importlib import resources
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from roomcast.backends.broker import BrokerUnavailable
from roomcast.config import Config
from roomcast.metrics import Metrics
from roomcast.protocol import envelopes
from roomcast.service.service import Service
from roomcast.transports.handshake import Refusal
from roomcast.transports.websocket import WebSocketEndpoint

REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           429: "Too Many Requests", 503: "Service Unavailable"}


def response(status: int, body: bytes, content_type: str,
             extra: tuple[tuple[str, str], ...] = ()) -> Response:
    headers = Headers([
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        *extra,
    ])
    return Response(status, REASONS.get(status, "OK"), headers, body)


def refusal_response(refusal: Refusal) -> Response:
    return response(refusal.status, refusal.text.encode() + b"\n", "text/plain; charset=utf-8",
                    refusal.headers)


def json_response(status: int, value: Any) -> Response:
    return response(status, orjson.dumps(value), "application/json")


def text_response(status: int, text: str) -> Response:
    return response(status, text.encode() + b"\n", "text/plain; charset=utf-8")


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
        self._page = resources.files("roomcast.transports").joinpath(
            "static", "index.html").read_bytes()

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
        path = urlsplit(request.path).path
        method = request.method if hasattr(request, "method") else "GET"
        if path.startswith("/admin/"):
            return await self.admin(request, method, path)
        if method != "GET":
            return text_response(405, "only GET is served here")
        if path == "/":
            return response(200, self._page, "text/html; charset=utf-8")
        if path == "/healthz":
            return self.healthz()
        if path == "/readyz":
            return self.readyz()
        if path == "/metrics":
            return response(200, self.metrics.render(),
                            "text/plain; version=0.0.4; charset=utf-8")
        if path == "/api/stats":
            return json_response(200, await self.service.stats(public_only=True))
        if path.startswith("/api/rooms/") and path.endswith("/members"):
            room = path[len("/api/rooms/"):-len("/members")]
            if not envelopes.valid_room(room):
                return json_response(404, {"error": "invalid room name"})
            if not self.service.public_presence(room):
                # Only rooms anyone may join show who is in them here (docs/PROTOCOL.md).
                return json_response(403, {"error": "this room's presence is not public"})
            members = await self.service.members(room)
            return json_response(200, {
                "room": room,
                "members": [m.to_dict() for m in members],
                "count": len({m.user_id for m in members}),
            })
        return text_response(404, "not found")

    def healthz(self) -> Response:
        """Liveness: 200 whenever the process serves HTTP, whatever Redis does (a restart would
        not bring Redis back); ``broker`` and, in cluster mode, ``redis`` say how it is."""
        body: dict[str, Any] = {"status": "ok", "node_id": self.config.node_id,
                                "broker": self.service.broker.available}
        if self._backend is not None:
            body["redis"] = self._backend.problem() or "ok"
        return json_response(200, body)

    def readyz(self) -> Response:
        """Readiness: 503 ``draining`` from the start of a drain; 503 ``unavailable`` with the
        reason while Redis is unreachable or refuses writes (``redis``: unreachable, timeout,
        oom, readonly, misconf, error), from the write probe and the failures requests saw;
        otherwise 200 ``ready``."""
        if not self.lifecycle.accepting:
            return json_response(503, {"status": "draining"})
        problem = self._backend.problem() if self._backend is not None else None
        if problem is not None:
            return json_response(503, {"status": "unavailable", "redis": problem})
        return json_response(200, {"status": "ready"})

    async def admin(self, request: Request, method: str, path: str) -> Response:
        token = self.config.admin_token
        if not token:
            return text_response(404, "admin endpoints are disabled (no --admin-token)")
        offered = request.headers.get("Authorization", "")
        if not hmac.compare_digest(offered.encode(), f"Bearer {token}".encode()):
            return text_response(401, "missing or wrong bearer token")
        if path == "/admin/drain":
            if method != "POST":
                return text_response(405, "use POST")
            self.lifecycle.request_drain()
            return json_response(202, {"status": "draining", "node_id": self.config.node_id})
        return text_response(404, "not found")
