"""The Node: builds every layer from one Config and owns the lifecycle.

Composition root: backends (chosen in one place, ``backends.build``), the service with its local
rooms, and the transports on the client port. Shutdown is one idempotent path: readiness off,
stop accepting, close connections, close the service (presence removes this node's entries) and
the backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog
from websockets.asyncio.server import Server, serve

from roomcast import backends, clock, namespaces
from roomcast.config import Config
from roomcast.metrics import Metrics
from roomcast.protocol import dialects
from roomcast.protocol.closecodes import CloseCode
from roomcast.service.auth import Authenticator
from roomcast.service.rooms import Rooms
from roomcast.service.server import ApiKeys, ServerActions
from roomcast.service.service import Service
from roomcast.transports.api import ApiServer
from roomcast.transports.drain import close_now, close_paced
from roomcast.transports.http import HttpRoutes
from roomcast.transports.session import Session
from roomcast.transports.websocket import WebSocketEndpoint
from roomcast.transports.writer import FrameWriter, SessionFanout

log = structlog.get_logger("roomcast.node")

#: Where Linux keeps the cap on every listen backlog.
SOMAXCONN = "/proc/sys/net/core/somaxconn"


def somaxconn() -> int | None:
    """The kernel's cap on listen backlogs (None where there is no such file: not Linux)."""
    try:
        with open(SOMAXCONN) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class Node:
    """One roomcast node. ``await node.start()``, then ``await node.run()`` until a signal."""

    def __init__(self, config: Config) -> None:
        """Raises ValueError (one line, naming the flag or file) for a namespaces file that
        cannot be used."""
        self.config = config
        self.node_id = config.node_id
        # Bound before the backends are made: their Redis batchers log with it (redis_batch).
        structlog.contextvars.bind_contextvars(node_id=self.node_id)
        self.metrics = Metrics()
        self.writer = FrameWriter()
        spaces = namespaces.load(config)
        stores = backends.build(config, spaces)
        fanout = SessionFanout(self.writer, self.metrics, config.max_send_buffer)
        rooms = Rooms(stores.broker, fanout, self.metrics, config.unsubscribe_linger,
                      dialects.ENCODERS)
        self.auth = Authenticator(config)
        self.service = Service(config, stores, rooms, self.metrics, spaces, self.auth)
        self.websocket = WebSocketEndpoint(config, self.service, self.writer, self.metrics,
                                           self.auth)
        self.http = HttpRoutes(config, self.service, self.metrics, self, self.websocket)
        self.api = ApiServer(config, ServerActions(self.service), ApiKeys(config), self.metrics,
                             self.http)
        self.server: Server | None = None
        self.port = 0
        self.api_port = 0
        self._accepting = False
        self._stopped = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._signals = 0

    @property
    def accepting(self) -> bool:
        return self._accepting

    def sessions(self) -> list[Session]:
        """Every open WebSocket session (the service's connections are all sessions here)."""
        return [c for c in self.service.connections.values() if isinstance(c, Session)]

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the backends and start listening; logs 'node started' with the bound port.

        Raises ValueError (one line) for a key file that cannot be used, before anything is
        connected; any failure after that (a port in use, say) releases what was started, so
        that the process can exit instead of hanging on the lease thread.
        """
        structlog.contextvars.bind_contextvars(node_id=self.node_id)
        if self.config.auth == "none":
            log.warning("--auth none: identities are not verified, any client may name any "
                        "user_id; use --auth jwt in production")
        self.api.keys.load()
        await self.auth.start()
        await self.service.start()
        try:
            await self._listen()
        except BaseException:
            await self.shutdown()
            raise

    async def _listen(self) -> None:
        cfg = self.config
        self.server = await serve(
            self.websocket.handle,
            cfg.host,
            cfg.port,
            process_request=self.http.process_request,
            compression="deflate" if cfg.compression else None,
            max_size=cfg.max_message_size,
            ping_interval=cfg.ping_interval or None,
            ping_timeout=cfg.ping_timeout or None,
            close_timeout=cfg.close_timeout,
            server_header="roomcast",
            # Charges each frame to the rate limit as it arrives (transports/websocket.py).
            create_connection=self.websocket.connection_class,
            backlog=cfg.backlog,
        )
        sockname = next(iter(self.server.sockets)).getsockname()
        self.port = sockname[1]
        capped = somaxconn()
        if capped is not None and capped < cfg.backlog:
            log.warning("listen backlog capped by net.core.somaxconn", backlog=cfg.backlog,
                        somaxconn=capped, fix="sysctl -w net.core.somaxconn=<backlog> (a pod: "
                        "securityContext.sysctls)")
        self.api_port = await self.api.start()
        self._accepting = True
        self.metrics.ready.set(1)
        self.metrics.broker_up.set_function(
            lambda: 1.0 if self.service.broker.available else 0.0)
        log.info(
            "node started", host=cfg.host, port=self.port, api_host=cfg.api_host,
            api_port=self.api_port, url=f"http://{cfg.host}:{self.port}/",
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
        """Begin a drain (see transports/drain.py) once; later calls are harmless."""
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
        started = clock.monotonic()
        self._stop_accepting()
        sessions = self.sessions()
        log.info("drain started", connections=len(sessions), delay=cfg.drain_delay,
                 window=cfg.drain_window)
        await asyncio.sleep(cfg.drain_delay)
        tasks = await close_paced(self.sessions(), self.service.positions, cfg.drain_window)
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                       cfg.close_timeout)
        log.info("drain closed connections", closed=len(tasks),
                 seconds=round(clock.monotonic() - started, 2))
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
        sessions = self.sessions()
        log.info("node stopping", connections=len(sessions), code=code)
        if self.server is not None:
            self.server.close(close_connections=False)
            reason = "service restart" if code == CloseCode.SERVICE_RESTART else "going away"
            await close_now(sessions, code, reason, within=self.config.close_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), self.config.close_timeout)
        try:
            # A Redis that hangs must not hold the exit past what a supervisor waits for.
            await asyncio.wait_for(self.service.close(), self.config.close_timeout * 2)
        except TimeoutError:
            log.warning("backends did not close in time; exiting anyway",
                        seconds=self.config.close_timeout * 2)
        await self.api.close()
        await self.auth.close()
        log.info("node stopped")
        self._stopped.set()
