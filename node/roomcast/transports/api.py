"""The internal port: the server API, liveness, readiness, metrics and admin (aiohttp.web).

It runs on the node's event loop beside the client port, on ``--api-host``:``--api-port`` (the
pod's or loopback address; the balancer never exposes it). Routes (docs/API.md):

* ``GET /livez``, ``GET /readyz``, ``GET /metrics``;
* ``POST /admin/drain`` with ``Authorization: Bearer <--admin-token>``;
* ``POST /api/<method>`` with ``Authorization: apikey <key>`` (or ``X-API-Key``): JSON in, JSON
  out, each method one call on ``ServerActions`` (service/server.py).

Errors are ``{"error": {"code", "message"}}`` with a status that means what it says (``STATUS``).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from roomcast.backends.broker import BrokerUnavailable
from roomcast.config import Config
from roomcast.metrics import Metrics
from roomcast.protocol.envelopes import ErrorCode, ProtocolError
from roomcast.service.ratelimit import TokenBucket
from roomcast.service.server import ApiKeys, ServerActions
from roomcast.transports.http import HttpRoutes

log = structlog.get_logger("roomcast.api")

#: Error code -> HTTP status.
STATUS: Final = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    "not_found": 404,
    ErrorCode.UNKNOWN_NAMESPACE: 404,
    "method_not_allowed": 405,
    ErrorCode.ROOM_FULL: 409,
    "payload_too_large": 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}
#: Keys whose request buckets are kept (the least recently used go first beyond it).
MAX_TRACKED_KEYS: Final = 1024


class ApiError(Exception):
    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


def error_response(code: str, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(status=STATUS.get(code, 400), headers=headers,
                        body=orjson.dumps({"error": {"code": code, "message": message}}),
                        content_type="application/json")


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(value),
                        content_type="application/json")


class ApiServer:
    def __init__(self, config: Config, actions: ServerActions, keys: ApiKeys, metrics: Metrics,
                 routes: HttpRoutes) -> None:
        self.config = config
        self.actions = actions
        self.keys = keys
        self.metrics = metrics
        self.routes = routes
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self._methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "publish": self._publish,
            "broadcast": self._broadcast,
            "presence": self._presence,
            "presence_stats": self._presence_stats,
            "history": self._history,
            "disconnect": self._disconnect,
            "unsubscribe": self._unsubscribe,
            "rooms": self._rooms,
            "info": self._info,
        }

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen on --api-host:--api-port; returns the bound port. (The keys are loaded by
        the node first: ``ApiKeys.load``.)"""
        app = web.Application(client_max_size=self.config.api_max_body,
                              middlewares=[self._errors])
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/admin/drain", self._drain)
        app.router.add_route("*", "/api/{method}", self._call)
        # No access log: the node logs what matters, and a scrape every few seconds is noise.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.api_host, self.config.api_port)
        await site.start()
        server = site._server  # aiohttp keeps the asyncio server private; its socket says the port.
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def _label(self, request: web.Request) -> str:
        """The metric label of a request: a known method, or "other" (a label per unknown
        name would let anyone grow the metrics without bound)."""
        method = request.match_info.get("method", "")
        return method if method in self._methods or method == "batch" else "other"

    # --- plain routes ------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        """Every failure as the JSON error body, with its status; every answer of /api/ is
        counted (roomcast_api_requests_total)."""
        try:
            answer = await handler(request)
        except ApiError as exc:
            answer = error_response(exc.code, exc.message, exc.retry_after)
        except web.HTTPRequestEntityTooLarge:
            answer = error_response("payload_too_large",
                                    f"the body is larger than {self.config.api_max_body} bytes")
        except web.HTTPNotFound:
            answer = error_response("not_found", "no such route")
        except web.HTTPMethodNotAllowed:
            answer = error_response("method_not_allowed", "use POST for /api/, GET otherwise")
        except asyncio.CancelledError:
            raise
        except Exception:
            # Task boundary: a bug answers 500 with the JSON body; the text stays in the log.
            log.error("server API request crashed", path=request.path, exc_info=True)
            answer = error_response(ErrorCode.INTERNAL, "internal error")
        if request.path.startswith("/api/"):
            self.metrics.api_requests.labels(method=self._label(request),
                                             status=answer.status).inc()
        return answer

    async def _livez(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "node_id": self.config.node_id})

    async def _readyz(self, request: web.Request) -> web.Response:
        status, body = self.routes.readiness()
        return json_response(body, status)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _drain(self, request: web.Request) -> web.Response:
        token = self.config.admin_token
        if not token:
            raise ApiError("not_found", "admin endpoints are disabled (no --admin-token)")
        offered = request.headers.get("Authorization", "")
        if not hmac.compare_digest(offered.encode(), f"Bearer {token}".encode()):
            raise ApiError(ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
        self.routes.lifecycle.request_drain()
        return json_response({"status": "draining", "node_id": self.config.node_id}, 202)

    # --- the API -----------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> str:
        """The request's key when it is valid; ApiError otherwise (404 with no key configured:
        the API is off, never open)."""
        if not self.keys.enabled:
            raise ApiError("not_found", "the server API is off (no --api-key)")
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        offered = value.strip() if scheme.lower() == "apikey" else request.headers.get(
            "X-API-Key", "").strip()
        if not offered:
            raise ApiError(ErrorCode.UNAUTHORIZED,
                           "send the key as 'Authorization: apikey <key>' or 'X-API-Key'")
        if not self.keys.valid(offered):
            raise ApiError(ErrorCode.UNAUTHORIZED, "wrong API key")
        return offered

    def _charge(self, key: str) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_KEYS:
                self._buckets.pop(next(iter(self._buckets)))
            rate = self.config.api_rate
            bucket = self._buckets[key] = TokenBucket(rate, max(1, int(rate * 2)))
        verdict = bucket.charge()
        if not verdict.allowed:
            raise ApiError(ErrorCode.RATE_LIMITED, "too many requests for this key",
                           retry_after=max(1, -(-verdict.retry_after_ms // 1000)))

    async def _call(self, request: web.Request) -> web.Response:
        key = self._authorize(request)
        if request.method != "POST":
            raise ApiError("method_not_allowed", "the API takes POST")
        method = request.match_info["method"]
        if method != "batch" and method not in self._methods:
            raise ApiError("not_found", f"no method {method[:32]!r}")
        self._charge(key)
        try:
            async with asyncio.timeout(self.config.api_timeout):
                body = await request.read()
        except TimeoutError:
            raise ApiError(ErrorCode.BAD_REQUEST, "the body did not arrive in time") from None
        params = _params(body)
        if method == "batch":
            result: Any = await self._batch(key, params)
        else:
            result = await self._run(method, params)
        return json_response(result)

    async def _run(self, method: str, params: dict[str, Any]) -> Any:
        """One method; ProtocolError and BrokerUnavailable become ApiError."""
        try:
            async with asyncio.timeout(self.config.api_timeout):
                return await self._methods[method](params)
        except ProtocolError as exc:
            raise ApiError(exc.code, exc.message) from None
        except BrokerUnavailable:
            raise ApiError(ErrorCode.UNAVAILABLE, "the cluster backend is unavailable; nothing "
                           "was done, retry later", retry_after=1) from None
        except TimeoutError:
            raise ApiError(ErrorCode.UNAVAILABLE, "the cluster backend did not answer in time; "
                           "it may or may not have been done", retry_after=1) from None

    async def _batch(self, key: str, params: dict[str, Any]) -> dict[str, Any]:
        """Commands in order, each answered on its own: ``replies`` holds one ``result`` or
        ``error`` per command. Each command costs a request of --api-rate (the batch itself
        paid for the first), and the whole batch has --api-timeout."""
        commands = params.get("commands")
        limit = self.config.api_max_batch
        if not isinstance(commands, list) or not 0 < len(commands) <= limit:
            raise ApiError(ErrorCode.BAD_REQUEST, f"commands must be a list of 1 to {limit} "
                           "{\"method\", \"params\"} objects")
        for _ in commands[1:]:
            self._charge(key)
        try:
            async with asyncio.timeout(self.config.api_timeout):
                return {"replies": await self._commands(commands)}
        except TimeoutError:
            raise ApiError(ErrorCode.UNAVAILABLE, "the batch did not finish in time; some "
                           "commands may have been done", retry_after=1) from None

    async def _commands(self, commands: list[Any]) -> list[dict[str, Any]]:
        replies: list[dict[str, Any]] = []
        for command in commands:
            method = command.get("method") if isinstance(command, dict) else None
            inner = command.get("params", {}) if isinstance(command, dict) else None
            if method not in self._methods or not isinstance(inner, dict):
                replies.append({"error": {"code": ErrorCode.BAD_REQUEST, "message":
                                          "each command needs a known method and params"}})
                continue
            try:
                replies.append({"result": await self._run(str(method), inner)})
            except ApiError as exc:
                replies.append({"error": {"code": exc.code, "message": exc.message}})
        return replies

    # --- methods -----------------------------------------------------------------------------

    async def _publish(self, p: dict[str, Any]) -> dict[str, Any]:
        _require(p, "room", "data")
        published = await self.actions.publish(p["room"], p["data"], p.get("idempotency_key"))
        return {"offset": published.offset, "epoch": published.epoch,
                **({"duplicate": True} if published.duplicate else {})}

    async def _broadcast(self, p: dict[str, Any]) -> dict[str, Any]:
        _require(p, "rooms", "data")
        rooms = p["rooms"]
        limit = self.config.api_max_batch
        if not isinstance(rooms, list) or not 0 < len(rooms) <= limit:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"rooms must be a list of 1 to {limit} "
                                "rooms")
        results: list[dict[str, Any]] = []
        for room in rooms:
            try:
                published = await self.actions.publish(room, p["data"])
                results.append({"room": room, "offset": published.offset,
                                "epoch": published.epoch})
            except ProtocolError as exc:
                results.append({"room": room, "error": {"code": exc.code,
                                                        "message": exc.message}})
            except BrokerUnavailable:
                results.append({"room": room, "error": {
                    "code": ErrorCode.UNAVAILABLE, "message": "the cluster backend is "
                    "unavailable; not published"}})
        return {"results": results}

    async def _presence(self, p: dict[str, Any]) -> dict[str, Any]:
        _require(p, "room")
        members = await self.actions.presence(p["room"])
        return {"members": members, "count": len({m["user_id"] for m in members})}

    async def _presence_stats(self, p: dict[str, Any]) -> dict[str, int]:
        _require(p, "room")
        return await self.actions.presence_stats(p["room"])

    async def _history(self, p: dict[str, Any]) -> dict[str, Any]:
        _require(p, "room")
        return await self.actions.history(p["room"], p.get("since"), p.get("limit"),
                                          p.get("reverse", False))

    async def _disconnect(self, p: dict[str, Any]) -> dict[str, Any]:
        _require(p, "user")
        await self.actions.disconnect(p["user"], p.get("code", 4500),
                                      p.get("reason", "disconnected"))
        return {}

    async def _unsubscribe(self, p: dict[str, Any]) -> dict[str, Any]:
        _require(p, "user", "room")
        await self.actions.unsubscribe(p["user"], p["room"])
        return {}

    async def _rooms(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"rooms": await self.actions.rooms(p.get("pattern"))}

    async def _info(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self.actions.info()


def _params(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        params = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(ErrorCode.BAD_REQUEST, "the body is not valid JSON") from None
    if not isinstance(params, dict):
        raise ApiError(ErrorCode.BAD_REQUEST, "the body must be a JSON object")
    return params


def _require(params: dict[str, Any], *names: str) -> None:
    for name in names:
        if name not in params:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"missing field {name!r}")
