"""The Node: wires config, broker, presence, hub, handlers and HTTP routes, and owns the lifecycle.

The backend is chosen in one place (``build_backends``): no Redis URL, memory; a URL, Redis.
Shutdown is one idempotent path: readiness off, stop accepting, close connections, close the
presence store (removing this node's entries) and the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve

from node import dialects
from node.broker import Broker, MemoryBroker
from node.closecodes import CloseCode
from node.config import Config
from node.drain import close_now, close_paced
from node.handlers import Handlers, now_ms
from node.http import HttpRoutes
from node.hub import Hub
from node.keys import Keys
from node.metrics import Metrics
from node.presence import MemoryPresence, PresenceStore
from node.protocol import event
from node.session import Session

log = structlog.get_logger("roomcast.node")

DRAIN_MARGIN = 5.0  # Seconds past the window for the last closing handshakes.


def build_backends(config: Config) -> tuple[Broker, PresenceStore]:
    """Memory backends for a lone node, Redis ones when a URL is configured."""
    if config.redis_url is None:
        return (
            MemoryBroker(config.history_size, config.history_ttl),
            MemoryPresence(config.node_id, config.presence_grace),
        )
    from node.broker_redis import RedisBroker
    from node.presence_redis import RedisPresence

    keys = Keys(config.redis_prefix)
    broker = RedisBroker(config.redis_url, keys, config.history_size, config.history_ttl)
    presence = RedisPresence(
        broker.redis, keys, config.node_id, config.presence_grace, config.node_lease_ttl
    )
    return broker, presence


class Node:
    """One roomcast node. ``await node.start()``, then ``await node.run()`` until a signal."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node_id = config.node_id
        self.metrics = Metrics()
        self.broker, self.presence = build_backends(config)
        self.hub = Hub(self.broker, self.metrics, config.unsubscribe_linger, dialects.ENCODERS,
                       config.max_send_buffer)
        self.handlers = Handlers(self)
        self.http = HttpRoutes(self)
        self.sessions: dict[str, Session] = {}
        self.server: Server | None = None
        self.port = 0
        self._accepting = False
        self._stopped = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._signals = 0

    # --- state seen by handlers and routes ------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._accepting

    def register(self, session: Session) -> None:
        self.sessions[session.conn_id] = session
        self.metrics.connections.labels(dialect=session.dialect).inc()
        self.presence.set_connection_count(len(self.sessions))

    async def unregister(self, session: Session) -> None:
        self.sessions.pop(session.conn_id, None)
        self.metrics.connections.labels(dialect=session.dialect).dec()
        self.presence.set_connection_count(len(self.sessions))
        for room in list(session.rooms):
            try:
                await self.handlers.leave_room(session, room)
            except Exception:
                log.warning("presence cleanup failed", room=room, exc_info=True)

    def client_address(self, ws: ServerConnection) -> str:
        """The client's address: the peer, unless the peer is a trusted proxy, in which case
        X-Forwarded-For is walked from the right past every trusted proxy (CDN -> nginx ->
        node); anything left of the first untrusted hop may be forged and is ignored."""
        address = str(ws.remote_address[0]) if ws.remote_address else ""
        trusted = self.config.trusted_proxies
        if address not in trusted or ws.request is None:
            return address
        hops = [h.strip() for h in ws.request.headers.get("X-Forwarded-For", "").split(",")]
        for hop in reversed([h for h in hops if h]):
            address = hop
            if hop not in trusted:
                break
        return address

    async def stats(self) -> dict[str, Any]:
        cluster = await self.presence.stats()
        return {
            "node_id": self.node_id,
            "connections": len(self.sessions),
            "rooms": self.hub.local_counts(),
            "cluster": cluster,
        }

    async def user_left(self, room: str, user_id: str, username: str) -> None:
        """Presence decided the user is gone: tell the room on every node."""
        try:
            await self.broker.publish_event(
                room, event("user_left", room, user_id=user_id, username=username, ts=now_ms())
            )
        except Exception:
            log.warning("could not announce user_left", room=room, exc_info=True)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the backends and start listening; logs 'node started' with the bound port."""
        structlog.contextvars.bind_contextvars(node_id=self.node_id)
        await self.broker.start(self.hub.deliver)
        wait = getattr(self.broker, "wait_connected", None)
        if wait is not None and not await wait(5.0):
            log.warning("starting without redis; publishes fail until it is reachable")
        await self.presence.start(self.user_left)
        cfg = self.config
        self.server = await serve(
            self.handlers.handle,
            cfg.host,
            cfg.port,
            process_request=self.http.process_request,
            compression="deflate" if cfg.compression else None,
            max_size=cfg.max_message_size,
            ping_interval=cfg.ping_interval or None,
            ping_timeout=cfg.ping_timeout or None,
            close_timeout=5,
            server_header="roomcast",
        )
        sockname = next(iter(self.server.sockets)).getsockname()
        self.port = sockname[1]
        self._accepting = True
        self.metrics.ready.set(1)
        self.metrics.broker_up.set_function(lambda: 1.0 if self.broker.available else 0.0)
        log.info(
            "node started", host=cfg.host, port=self.port,
            url=f"http://{cfg.host}:{self.port}/",
            mode="cluster" if cfg.clustered else "embedded",
        )

    async def run(self) -> None:
        """Serve until stopped: the first SIGTERM/SIGINT drains, a second one stops at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await self._stopped.wait()

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        log.info("signal received", signal=sig.name, count=self._signals)
        if self._signals == 1:
            self.request_drain()
        else:
            self.request_stop_now()

    def request_drain(self) -> None:
        """Begin a drain (see node/drain.py) once; later calls are harmless."""
        if self._drain_task is None and self._shutdown_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    def request_stop_now(self) -> None:
        """Stop at once: close what is left with 1001 (a second signal during a drain)."""
        if self._drain_task is not None:
            self._drain_task.cancel()
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self.shutdown(CloseCode.GOING_AWAY))

    async def _drain(self) -> None:
        cfg = self.config
        started = time.monotonic()
        self._stop_accepting()
        log.info("drain started", connections=len(self.sessions), delay=cfg.drain_delay,
                 window=cfg.drain_window)
        await asyncio.sleep(cfg.drain_delay)
        tasks = await close_paced(list(self.sessions.values()), self.hub, cfg.drain_window)
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                       DRAIN_MARGIN)
        log.info("drain closed connections", closed=len(tasks),
                 seconds=round(time.monotonic() - started, 2))
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(
                self.shutdown(CloseCode.SERVICE_RESTART))

    def _stop_accepting(self) -> None:
        self._accepting = False
        self.metrics.ready.set(0)

    async def shutdown(self, code: int = CloseCode.GOING_AWAY) -> None:
        """Readiness off, stop listening, close connections, close backends. Idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._stop_accepting()
        log.info("node stopping", connections=len(self.sessions), code=code)
        if self.server is not None:
            self.server.close(close_connections=False)
            reason = "service restart" if code == CloseCode.SERVICE_RESTART else "going away"
            await close_now(list(self.sessions.values()), code, reason, within=5.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 5.0)
        await self.hub.close()
        await self.presence.close()
        await self.broker.close()
        log.info("node stopped")
        self._stopped.set()
