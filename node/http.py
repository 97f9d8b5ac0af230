"""Plain HTTP on the WebSocket port, answered in ``process_request`` before any upgrade.

Routes: ``/`` (test page; the tutorial dialect's WebSocket when it is an upgrade), ``/healthz``,
``/readyz``, ``/metrics``, ``/api/stats``, ``/api/rooms/{room}/members``, and ``/admin/drain``.
WebSocket upgrades are accepted only on ``/``, ``/ws`` and ``/ws/chat/{room}``.
"""

from __future__ import annotations

import hmac
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from node import protocol
from node.broker import BrokerUnavailable

if TYPE_CHECKING:
    from node.server import Node

REASONS = {200: "OK", 202: "Accepted", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 503: "Service Unavailable"}


def response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers([
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
    ])
    return Response(status, REASONS.get(status, "OK"), headers, body)


def json_response(status: int, value: Any) -> Response:
    return response(status, orjson.dumps(value), "application/json")


def text_response(status: int, text: str) -> Response:
    return response(status, text.encode() + b"\n", "text/plain; charset=utf-8")


def is_websocket_route(path: str) -> bool:
    return path in ("/", "/ws") or path.startswith("/ws/chat/")


class HttpRoutes:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._page = resources.files("node").joinpath("static", "index.html").read_bytes()

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Answer plain HTTP; return None to let a WebSocket handshake proceed."""
        try:
            return await self.route(request)
        except BrokerUnavailable:
            return json_response(503, {"error": "the cluster backend is unavailable"})

    async def route(self, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade:
            if not is_websocket_route(path):
                return text_response(404, "no WebSocket endpoint at this path")
            if not self.node.accepting:
                # A draining node sends handshakes elsewhere: 503 makes nginx try the next one.
                return text_response(503, "node is draining; connect to another node")
            return None
        method = request.method if hasattr(request, "method") else "GET"
        if path.startswith("/admin/"):
            return await self.admin(request, method, path)
        if method != "GET":
            return text_response(405, "only GET is served here")
        if path == "/":
            return response(200, self._page, "text/html; charset=utf-8")
        if path == "/healthz":
            return json_response(200, {"status": "ok", "node_id": self.node.node_id,
                                       "broker": self.node.broker.available})
        if path == "/readyz":
            if self.node.accepting:
                return json_response(200, {"status": "ready"})
            return json_response(503, {"status": "draining"})
        if path == "/metrics":
            return response(200, self.node.metrics.render(),
                            "text/plain; version=0.0.4; charset=utf-8")
        if path == "/api/stats":
            return json_response(200, await self.node.stats())
        if path.startswith("/api/rooms/") and path.endswith("/members"):
            room = path[len("/api/rooms/"):-len("/members")]
            if not protocol.valid_room(room):
                return json_response(404, {"error": "invalid room name"})
            members = await self.node.presence.members(room)
            return json_response(200, {
                "room": room,
                "members": [m.to_dict() for m in members],
                "count": len({m.user_id for m in members}),
            })
        return text_response(404, "not found")

    async def admin(self, request: Request, method: str, path: str) -> Response:
        token = self.node.config.admin_token
        if not token:
            return text_response(404, "admin endpoints are disabled (no --admin-token)")
        offered = request.headers.get("Authorization", "")
        if not hmac.compare_digest(offered.encode(), f"Bearer {token}".encode()):
            return text_response(401, "missing or wrong bearer token")
        if path == "/admin/drain":
            if method != "POST":
                return text_response(405, "use POST")
            self.node.request_drain()
            return json_response(202, {"status": "draining", "node_id": self.node.node_id})
        return text_response(404, "not found")
