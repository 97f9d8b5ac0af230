"""The WebSocket endpoint: one loop for every dialect, over the service layer.

A connection is routed by path to a codec (protocol/codecs.py): ``/ws`` native, ``/ws/chat/{room}``
the FastAPI tutorial, ``/`` the python-websockets tutorial. After the dialect's opening (a welcome,
an automatic join, a nick handshake), every frame goes through the same steps: the rate limit,
``codec.decode`` into a request, one call on the ``Service``, ``codec`` to encode the outcome. An
error is mapped to the dialect's error shape here, once. Every write to a client goes through
``Session.send``: a synchronous push into the connection after any fan-out still pending for it,
so that replies, history replays and live fan-out reach a client in the order the node made them,
under the slow-consumer policy (``SendBudget``, 4000) that fan-out applies.

The rate limit is charged as frames arrive, not as the loop reaches them: ``AdmittedConnection``
(the node's websockets connection class) takes a token for every frame, control frames included,
in ``process_event``, and queues each message's verdict beside the message; the loop consumes
the verdicts in the same order. A backlog the node built up (a stalled Redis, a busy loop) is
thus never charged to the client, and a flood of pings is closed like any other flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar
from urllib.parse import parse_qs

import orjson
import structlog
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request as HttpRequest

from roomcast import clock
from roomcast.backends.broker import BrokerUnavailable
from roomcast.config import Config
from roomcast.metrics import Metrics
from roomcast.protocol import dialects, envelopes
from roomcast.protocol.closecodes import CloseCode
from roomcast.protocol.codecs import (
    RATE_LIMITED_TEXT,
    UNAVAILABLE_TEXT,
    Codec,
    FastApiCodec,
    NativeCodec,
    TutorialCodec,
)
from roomcast.protocol.envelopes import ErrorCode, ProtocolError, Request
from roomcast.service.auth import ERROR_CODES, Authenticator, Claims, TokenError
from roomcast.service.connection import Identity
from roomcast.service.ratelimit import TokenBucket, Verdict
from roomcast.service.service import Joined, Service
from roomcast.transports.handshake import (
    MAX_HEAD,
    Gatekeeper,
    Refusal,
    answer,
    screen_head,
    split_target,
)
from roomcast.transports.session import Session, new_conn_id
from roomcast.transports.writer import FrameWriter, SendBudget

log = structlog.get_logger("roomcast.conn")

MAX_IDENTITY_LENGTH = 64
#: Publishes of one connection in flight at once (read-ahead, WebSocketEndpoint._publish), and
#: the most bytes their frames may add up to: constants, as they only bound what one connection
#: holds in the node while its round trips to Redis overlap. The count is what lets a burst of
#: small messages reach Redis, and the other nodes, in a few large batches, one flush to every
#: member each (docs/BENCHMARKS.md, "the publish window"); the bytes keep large messages to a
#: few dozen (1 MiB / --max-message-size). A text frame counts its characters, which is what it
#: holds in memory up to CPython's 4 bytes per character of non-Latin-1 text.
PUBLISH_WINDOW = 1024
PUBLISH_WINDOW_BYTES = 1 << 20
FASTAPI_PREFIX = "/ws/chat/"


def is_websocket_route(path: str) -> bool:
    return path in ("/", "/ws") or path.startswith(FASTAPI_PREFIX)


def uses_query_identity(path: str) -> bool:
    """True for the routes whose identity comes from the query string (not the tutorial's)."""
    return path == "/ws" or path.startswith(FASTAPI_PREFIX)


def query_identity(target: str) -> tuple[str, str]:
    """The ``user_id`` and ``username`` of a request target's query string ("" when absent),
    URL-decoded and cut to 64 characters each.

    Raises ProtocolError(bad_request), its message naming the field, when either has a
    character that is not printable (``envelopes.printable``): the handshake is refused.
    """
    query = parse_qs(split_target(target)[1])
    values = []
    for name in ("user_id", "username"):
        value = query.get(name, [""])[0]
        if not envelopes.printable(value):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{name} may have {envelopes.PRINTABLE_RULE}")
        values.append(value[:MAX_IDENTITY_LENGTH])
    return values[0], values[1]


@functools.lru_cache(maxsize=8)
def _networks(trusted: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                  ...]:
    """--trusted-proxies as networks: an address is a /32 (or /128), a CIDR its range (the
    balancer pods of a Kubernetes cluster: their addresses change, their range does not)."""
    networks = []
    for entry in trusted:
        with contextlib.suppress(ValueError):  # A name, not an address: matched as a string.
            networks.append(ipaddress.ip_network(entry, strict=False))
    return tuple(networks)


def is_trusted(address: str, trusted: tuple[str, ...]) -> bool:
    if address in trusted:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _networks(trusted))


def client_address(ws: ServerConnection, headers: Headers, trusted: tuple[str, ...]) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy (an address or CIDR of
    --trusted-proxies), in which case X-Forwarded-For is walked from the right past every trusted
    proxy (CDN -> nginx -> node); anything left of the first untrusted hop may be forged and is
    ignored."""
    address = str(ws.remote_address[0]) if ws.remote_address else ""
    if not trusted or not is_trusted(address, trusted):
        return address
    # Several X-Forwarded-For headers are one list (RFC 9110 section 5.3), in order.
    hops = [h.strip() for h in ",".join(headers.get_all("X-Forwarded-For")).split(",")]
    for hop in reversed([h for h in hops if h]):
        address = hop
        if not is_trusted(hop, trusted):
            break
    return address


def request_id(frame: str | bytes) -> Any:
    """The id of a request, best effort, for an error envelope about a frame not served; only
    a valid id (``envelopes.valid_id``) is echoed."""
    if isinstance(frame, bytes | bytearray | memoryview):
        return None
    try:
        obj = envelopes.decode_json(frame)
    except ProtocolError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if envelopes.valid_id(rid) else None


Opening = Callable[[Session, Any], Awaitable[bool]]

_DATA_START = (Opcode.TEXT, Opcode.BINARY)
_CONTROL = (Opcode.PING, Opcode.PONG)
#: Bytes of one read handed to the protocol at a time, so that a flood is noticed within about
#: a thousand pings rather than within a whole read (up to 256 KiB, forty thousand pings, which
#: the library would parse and answer before the node sees the first of them).
READ_SLICE = 8192
#: Seconds a flooder's connection stays after its 1008 close frame was sent. A constant, not
#: --close-timeout: the node stopped reading it, so no closing handshake can complete.
FLOOD_CLOSE_TIMEOUT = 0.5
#: The longest frame looked at for being a typing event (``{"type":"typing","room":...}`` with
#: a 64-character room and an id is well under it).
TYPING_PEEK = 192
#: Typing frames have a budget of their own (a browser sends one per keystroke) whose refusals
#: are dropped silently: TYPING_RATE a second, TYPING_BURST at once, a few times what is relayed
#: (one per --typing-interval and room), so that typing adds little to what a connection may
#: send. Only TYPING_FLOOD_FACTOR times more refusals in a row than --flood-close-after close
#: the connection, which no typist reaches (a held key repeats at about 30 a second).
TYPING_RATE = 5.0
TYPING_BURST = 10
TYPING_FLOOD_FACTOR = 10


def is_typing(data: bytes | bytearray | memoryview) -> bool:
    """True for a small text frame that is a JSON object of type typing (native, FastAPI)."""
    if len(data) > TYPING_PEEK or b"typing" not in data:
        return False
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("type") == "typing"


class AdmittedConnection(ServerConnection):
    """The node's websockets server connection: every frame is charged to the connection's
    token bucket as it arrives.

    websockets 17 calls ``process_event`` for each frame as it is parsed off the socket,
    before a data frame is queued for ``recv`` (``asyncio/connection.py``). Here a message's
    verdict (``Verdict``) is taken at its first frame, updated by its continuation frames, and
    queued in ``verdicts``, one per message in arrival order, for the endpoint's loop. A ping
    or pong costs a token too; one over the budget is refused only by counting towards the
    flood close (the library has already answered a ping by the time it is seen here), and
    the ``flood_close_after``-th refusal in a row closes the connection with 1008 at once.
    The time during which the library stops reading (more than ``max_queue`` messages wait) is
    credited to the bucket (``TokenBucket.pause``/``resume``).

    Subclassed per endpoint by ``WebSocketEndpoint`` (``endpoint`` is set); pass that subclass
    as ``serve(create_connection=...)``.
    """

    endpoint: ClassVar[WebSocketEndpoint]
    # Slots for what this class adds: kept out of the library's instance dict, which would
    # otherwise grow to its next size (about 1.5 KiB per connection).
    __slots__ = ("_has_typing", "_head", "address", "claims", "flooded", "limiter", "named",
                 "session", "typing_limiter", "verdicts")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.endpoint.config
        self.limiter = TokenBucket(config.rate_limit, config.rate_burst,
                                   flood_after=config.flood_close_after)
        #: The typing frames' own budget (TYPING_RATE).
        self.typing_limiter = TokenBucket(
            TYPING_RATE, TYPING_BURST, flood_after=config.flood_close_after * TYPING_FLOOD_FACTOR)
        #: Whether the dialect has typing at all (the tutorial on / has not); known from the
        #: request, at the first frame.
        self._has_typing: bool | None = None
        #: The verified token of the handshake (URL or header), if any.
        self.claims: Claims | None = None
        #: The query's (user_id, username) the handshake checked (--auth none), if any.
        self.named: tuple[str, str] | None = None
        #: The client address the handshake was counted under (Gatekeeper), once admitted.
        self.address: str | None = None
        #: The request head read so far, until it was screened (None after).
        self._head: bytearray | None = bytearray()
        #: One verdict per message received and not yet consumed, oldest first. A list: at most
        #: a few (the library reads no more than its max_queue ahead), and 56 bytes when empty.
        self.verdicts: list[Verdict] = []
        #: Set once the connection was closed for flooding: it is not read any more.
        self.flooded = False
        #: The session over this connection, once the handler made it.
        self.session: Session | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # The assembler of received messages pauses reading the socket when more than
        # max_queue messages wait for recv(), and resumes it when they are served: the
        # bucket is told, so that the frames that waited in the socket meanwhile are not
        # charged as if they had all been sent at once (websockets 17 asyncio/messages.py).
        assembler = self.recv_messages
        pause, resume = assembler.pause, assembler.resume

        def paused() -> None:
            self.limiter.pause()
            pause()

        def resumed() -> None:
            self.limiter.resume()
            if not self.flooded:
                resume()

        assembler.pause, assembler.resume = paused, resumed

    def _screen(self, data: bytes) -> bytes:
        """Hold the bytes of the request head until it is complete, then let it through only if
        the library will take it (``screen_head``); anything else is answered here with a 4xx
        and the connection closed. Returns what to hand on (b"" while waiting or refused)."""
        assert self._head is not None
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) <= MAX_HEAD:
            return b""
        buffered, self._head = bytes(self._head), None
        verdict = screen_head(buffered[:end + 4] if end >= 0 else buffered)
        if verdict is None:
            return buffered
        status, text = verdict
        self.endpoint.metrics.http_refused.labels(status=str(status)).inc()
        log.debug("http request refused", status=status, reason=text)
        self.transport.write(answer(status, text))
        self.transport.close()
        return b""

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.uncount()

    def count(self, address: str) -> None:
        """Count this connection against ``address`` and the node (Gatekeeper) until
        ``uncount``, which the loss of the TCP connection calls too."""
        self.endpoint.gate.admit(address)
        self.address = address

    def uncount(self) -> None:
        """Stop counting it; idempotent."""
        if self.address is not None:
            self.endpoint.gate.release(self.address)
            self.address = None

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            data = self._screen(data)
            if not data:
                return
        if self.flooded:
            return  # Nothing a flooder sends after its flood close is looked at.
        if len(data) <= READ_SLICE:
            super().data_received(data)
            return
        for start in range(0, len(data), READ_SLICE):
            super().data_received(data[start:start + READ_SLICE])
            if self.flooded:
                return

    def process_event(self, event: Any) -> None:
        if self.request is not None and isinstance(event, Frame):
            opcode = event.opcode
            # Every data message gets its verdict, even after a flood close: the loop takes
            # one per message it receives.
            if self._has_typing is None:
                self._has_typing = split_target(self.request.path)[0] != "/"
            if opcode is Opcode.TEXT and event.fin and self._has_typing and is_typing(event.data):
                verdict = self.typing_limiter.charge()
                self.verdicts.append(verdict if verdict.allowed else dataclasses.replace(
                    verdict, quiet=True))
            elif opcode in _DATA_START:
                self.verdicts.append(self.limiter.charge())
            elif opcode is Opcode.CONT:
                verdict = self.limiter.charge()
                if not verdict.allowed and self.verdicts:
                    self.verdicts[-1] = verdict  # A message is refused if any frame is.
            elif opcode in _CONTROL and not self.flooded:
                self._control(opcode)
        super().process_event(event)

    def _control(self, opcode: Opcode) -> None:
        verdict = self.limiter.charge()
        if not verdict.allowed:
            self.endpoint.metrics.errors.labels(code=ErrorCode.RATE_LIMITED).inc()
            if verdict.flood:
                self.close_flooding()
                return
        if opcode is Opcode.PING and self.session is not None:
            # The library wrote the pong: the same slow-consumer check as every other write.
            self.endpoint.budget.admits(self.session)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """websockets' closing handshake, bounded as a whole by ``close_timeout``, then the
        connection is dropped. The library first waits, without a limit, for the transport to
        drain below its high-water mark, and only then starts its own close_timeout: a client
        that stopped reading (a slow consumer, cut with 4000, has more than --max-send-buffer
        waiting) would keep its connection, and the node that buffer, until the next keepalive
        ping, or for good with --ping-interval 0.

        What the writer holds for it (fan-out, acks waiting for the next flush) is written
        before the close frame, unless it is a slow consumer being cut: the one place that does
        so for every close the node starts (Session.close, the drain, the stop, the handler's
        crash path, the flood close)."""
        session = self.session
        if session is not None and not session.slow:
            try:
                session.writer.write_pending(self)
            except Exception:  # A bug in fan-out must not keep the connection open as well.
                log.error("writing before a close failed", exc_info=True)
        try:
            async with asyncio.timeout(self.close_timeout):
                await super().close(code, reason)
        except TimeoutError:
            self.transport.abort()

    def close_flooding(self) -> None:
        """Close with 1008 'rate limit exceeded' and stop reading: nothing more it sends is
        looked at (the connection is dropped FLOOD_CLOSE_TIMEOUT later). Idempotent."""
        if self.flooded:
            return
        self.flooded = True
        log.info("closing flooding client",
                 conn_id=self.session.conn_id if self.session is not None else None,
                 refused=self.limiter.rejected_in_a_row)
        self.transport.pause_reading()
        # It is not read any more, so its closing reply would never be seen: give the close
        # frame a moment to go out, then drop the connection (not --close-timeout later).
        self.close_timeout = FLOOD_CLOSE_TIMEOUT
        task = asyncio.ensure_future(
            self.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded"))
        task.add_done_callback(_log_close_error)


class _Inflight(list[tuple["asyncio.Future[Any]", envelopes.Publish, int]]):
    """One connection's publishes in flight, oldest first, each with its frame's size, and
    the sum of those sizes. A list, not a deque: an idle connection's costs 64 bytes, not 600."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


def _log_close_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("closing a flooding client failed", exc_info=task.exception())


class WebSocketEndpoint:
    """``handle`` is the websockets connection handler of the node's client port."""

    def __init__(
        self, config: Config, service: Service, writer: FrameWriter, metrics: Metrics,
        auth: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.service = service
        self.writer = writer
        self.metrics = metrics
        self.auth = auth or Authenticator(config)
        #: The handshake checks and the connection counts they keep.
        self.gate = Gatekeeper(config, self.auth, metrics)
        #: The slow-consumer policy of single-client writes (fan-out has its own instance).
        self.budget = SendBudget(metrics, config.max_send_buffer)

        class NodeConnection(AdmittedConnection):
            pass

        NodeConnection.endpoint = self
        #: ``serve(create_connection=...)``: connections charged to this endpoint's limits.
        self.connection_class: type[AdmittedConnection] = NodeConnection

    # --- the handshake -----------------------------------------------------------------------

    async def handshake(
        self, ws: ServerConnection, request: HttpRequest, accepting: bool
    ) -> Refusal | None:
        """Every check of an upgrade request (transports/handshake.py), in order: route,
        drain, origin, node and address limits, handshake rate, the query identity (--auth
        none) or the token (--auth jwt). None: upgrade; the connection is then counted and
        carries its verified claims."""
        assert isinstance(ws, AdmittedConnection)
        gate = self.gate
        path = split_target(request.path)[0]
        if not is_websocket_route(path):
            return Refusal(404, "no WebSocket endpoint at this path", "not_found")
        if not accepting:
            # A draining node sends handshakes elsewhere: 503 makes nginx try the next one.
            return gate.refuse(Refusal(503, "node is draining; connect to another node",
                                       "draining"))
        # The cheap counts first, so that a flood of handshakes costs nothing more.
        address = client_address(ws, request.headers, self.config.trusted_proxies)
        refusal = gate.check_capacity(address) or gate.check_origin(request.headers)
        if refusal is not None:
            return refusal
        if self.config.auth == "none":
            if uses_query_identity(path):
                try:
                    ws.named = query_identity(request.path)
                except ProtocolError as exc:
                    return gate.refuse(Refusal(400, exc.message, "bad_request"))
            ws.count(address)
            return None
        # Counted before the token is checked: a check that waits (a JWK set being fetched)
        # must not let more handshakes past the limits meanwhile.
        ws.count(address)
        # Native clients may bring the token in their first frame instead (browsers cannot
        # set headers on a WebSocket); the chat dialects only in the URL or a header.
        required = path != "/ws" and not self.config.allow_anonymous
        try:
            verified = await gate.verify_request(request.headers, request.path, required)
        except BaseException:
            ws.uncount()
            raise
        if isinstance(verified, Refusal):
            ws.uncount()
            return verified
        ws.claims = verified
        return None

    def identity(self, ws: AdmittedConnection, conn_id: str, path: str) -> Identity | None:
        """Who a new connection is, from its handshake; None for a native one that must still
        send its connect frame (--auth jwt, no token in the URL or a header)."""
        if self.config.auth == "none":
            user_id, username = ws.named or ("", "")
            user_id = user_id or f"anon-{conn_id[:8]}"
            return Identity(user_id, username or user_id)
        if ws.claims is not None:
            return identity_of(ws.claims)
        if path == "/ws":
            return None
        return anonymous(conn_id)

    async def _authenticate(self, session: Session, codec: Codec) -> bool:
        """A native client with no token at the handshake: its first frame, within
        --auth-timeout, must be ``connect`` with a token (or, with --allow-anonymous, without
        one). Answers ``welcome``; otherwise an error and a close (4501, 4502, or 1013 when the
        keys cannot be had)."""
        ws = session.ws
        assert isinstance(ws, AdmittedConnection)
        try:
            frame = await asyncio.wait_for(ws.recv(), self.config.auth_timeout)
        except TimeoutError:
            return await self._refuse_token(session, codec, TokenError(
                "invalid", f"send a connect frame within {self.config.auth_timeout:g} s"))
        ws.verdicts.pop(0)  # The first frame: the bucket is full, it is always allowed.
        request: Request | None = None
        try:
            request = codec.decode(frame)
            rid = request.id
        except ProtocolError as exc:
            rid = exc.request_id
        if not isinstance(request, envelopes.Connect):
            return await self._refuse_token(session, codec, TokenError(
                "invalid", 'the first frame must be {"type": "connect", "token": "..."}'), rid)
        if request.token is None:
            if not self.config.allow_anonymous:
                return await self._refuse_token(session, codec, TokenError(
                    "invalid", "a token is required"), rid)
            session.identity = anonymous(session.conn_id)
        else:
            try:
                session.identity = identity_of(await self.auth.connection(request.token))
            except TokenError as exc:
                self.metrics.auth_failures.labels(reason=exc.reason).inc()
                return await self._refuse_token(session, codec, exc, rid)
        session.welcome_id = rid
        structlog.contextvars.bind_contextvars(user_id=session.identity.user_id)
        return True

    async def _refuse_token(self, session: Session, codec: Codec, exc: TokenError,
                            rid: Any = None) -> bool:
        """Say why the token was refused, then close: 4502 for an expired one, 1013 when it
        could not be checked, 4501 otherwise. Returns False (the connection is over)."""
        code = ERROR_CODES[exc.reason]
        close = {"expired": CloseCode.STALE_TOKEN,
                 "unavailable": CloseCode.TRY_AGAIN_LATER}.get(exc.reason, CloseCode.UNAUTHORIZED)
        self.metrics.errors.labels(code=code).inc()
        session.send(codec.error(code, exc.message, rid))
        await session.ws.close(close, exc.reason if exc.reason != "invalid" else "unauthorized")
        return False

    async def _count_user(self, session: Session, codec: Codec) -> bool:
        """The per-user limit across the cluster (--max-connections-per-user): past it, an
        error and close 4503."""
        if await self.service.count_user(session):
            return True
        limit = self.config.max_connections_per_user
        message = f"this user already has {limit} connections"
        self.metrics.errors.labels(code=ErrorCode.FORBIDDEN).inc()
        session.send(codec.error(ErrorCode.FORBIDDEN, message, session.welcome_id))
        await session.ws.close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
        return False

    def _watch_expiry(self, session: Session, codec: Codec) -> None:
        """At the token's exp: ``refresh_required``; --refresh-grace later, without a refresh
        in between, close 4002 (reconnect with a new token)."""
        session.stop_expiry()
        expires_at = session.identity.expires_at
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()

        def expired() -> None:
            grace = self.config.refresh_grace
            session.send(codec.refresh_required(int(grace * 1000)))
            session.expiry = loop.call_later(grace, session.close, CloseCode.TOKEN_EXPIRED,
                                             "token expired")

        session.expiry = loop.call_later(max(0.0, expires_at - clock.now_ms() / 1000), expired)

    async def _refresh(self, session: Session, codec: Codec, token: str, rid: Any) -> bytes:
        """A new token for the same user: new grants and expiry, the expiry watch restarted."""
        if self.config.auth != "jwt":
            raise ProtocolError(ErrorCode.BAD_REQUEST, "no tokens are used here (--auth none)")
        try:
            claims = await self.auth.connection(token)
        except TokenError as exc:
            raise self.service.token_refused(exc) from None
        who = session.identity
        if not who.authenticated or claims.user_id != who.user_id:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "the token is for another user")
        # The name and info stay as the room's presence shows them; rights and expiry change.
        session.identity = dataclasses.replace(who, grants=claims.grants,
                                               expires_at=claims.expires_at)
        self._watch_expiry(session, codec)
        reply = envelopes.refreshed(claims.expires_at, rid)
        # The new rights apply to the rooms it is in too: it leaves those they no longer admit.
        for room in await self.service.recheck(session):
            session.send(envelopes.revoked(room))
        return reply

    # --- entry point -------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        """Route a new connection to its dialect; close 1011 on a crash, never leak its text."""
        assert ws.request is not None and isinstance(ws, AdmittedConnection)
        path = split_target(ws.request.path)[0]
        codec: Any
        opening: Opening
        if path == "/":
            codec = TutorialCodec(self.config.tutorial_room, self.config.max_chat_length)
            opening = self._open_tutorial
        elif path.startswith(FASTAPI_PREFIX):
            codec, opening = FastApiCodec(path[len(FASTAPI_PREFIX):]), self._open_fastapi
        else:
            codec, opening = NativeCodec(), self._open_native
        conn_id = new_conn_id()
        identity = self.identity(ws, conn_id, path)
        session = Session(
            ws=ws, writer=self.writer, identity=identity or anonymous(conn_id),
            codec=codec.name, limiter=ws.limiter, budget=self.budget,
            conn_id=conn_id, peer=ws.address or "",
        )
        ws.session = session
        structlog.contextvars.bind_contextvars(conn_id=conn_id, dialect=codec.name)
        self.service.connected(session)
        self.metrics.connections.labels(dialect=codec.name).inc()
        log.info("connection opened", peer=session.peer,
                 user_id=identity.user_id if identity else None)
        try:
            if identity is None and not await self._authenticate(session, codec):
                return
            if await opening(session, codec):
                self._watch_expiry(session, codec)
                await self._serve(session, codec)
        except ConnectionClosed:
            pass
        except Exception:
            # Task boundary: a bug closes this connection only. The text stays in the log.
            log.error("handler crashed", exc_info=True)
            self.metrics.errors.labels(code=ErrorCode.INTERNAL).inc()
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            session.stop_expiry()
            await self.service.disconnected(session)
            self.metrics.connections.labels(dialect=codec.name).dec()
            # The code this node sent when it closed (1008, 1009, 1012...), else the client's.
            sent = ws.protocol.close_sent
            node_closed = sent is not None and not ws.protocol.close_rcvd_then_sent
            code = sent.code if sent is not None and node_closed else ws.close_code
            self.metrics.closes.labels(code=str(code)).inc()
            log.info("connection closed", code=code, reason=ws.close_reason)
            structlog.contextvars.clear_contextvars()

    # --- the one loop ------------------------------------------------------------------------

    async def _serve(self, session: Session, codec: Codec) -> None:
        inflight = _Inflight()  # Read-ahead, see _publish.
        async for frame in self._admitted(session, codec, inflight):
            rid = None
            try:
                request = codec.decode(frame)
                rid = request.id
                self.metrics.messages_in.labels(type=type(request).__name__.lower()).inc()
                if type(request) is envelopes.Publish:
                    await self._publish(session, codec, request, len(frame), inflight)
                    continue
                if inflight:  # Every reply in request order: the publishes' acks first.
                    await self._settle(session, codec, inflight, 0)
                await self._execute(session, codec, request)
            except Exception as exc:
                if inflight:  # A frame refused as it was read, too, is answered in its place.
                    await self._settle(session, codec, inflight, 0)
                if not self._refused(session, codec, exc, rid):
                    raise
        # The client is gone: what it published is in Redis' queue, and its acks go nowhere.

    async def _publish(self, session: Session, codec: Codec, request: envelopes.Publish,
                       size: int, inflight: _Inflight) -> None:
        """Read-ahead: start the publish (its frame ``size`` bytes) and go on reading the
        connection while it is in flight, up to PUBLISH_WINDOW of them and
        PUBLISH_WINDOW_BYTES of their frames (always at least one). With a broker over Redis
        a publish waits for its round trip; one at a time, a connection could publish no
        faster than one per round trip (and per fan-out queued behind it), and nothing would
        be left to coalesce.

        Order: the publishes start in the order they were read and none awaits anything
        before the broker has queued it (broker_redis.RedisBroker.publish), so they reach
        Redis in that order; their acks (or errors) are sent in that order too (_settle),
        and any other request waits until every publish before it was answered.
        """
        if len(inflight) >= PUBLISH_WINDOW or inflight.size + size > PUBLISH_WINDOW_BYTES:
            await self._settle(session, codec, inflight, PUBLISH_WINDOW - 1,
                               PUBLISH_WINDOW_BYTES - size)
        task = asyncio.ensure_future(self.service.publish(session, request.room, request.data))
        inflight.append((task, request, size))
        inflight.size += size
        task.add_done_callback(lambda _: self._answer_publishes(session, codec, inflight))

    async def _settle(self, session: Session, codec: Codec, inflight: _Inflight, keep: int,
                      keep_bytes: int = 0) -> None:
        """Wait until at most ``keep`` publishes, of at most ``keep_bytes`` together (or
        none), are in flight, the replies of the others sent."""
        while len(inflight) > keep or (inflight and inflight.size > keep_bytes):
            await asyncio.wait([inflight[0][0]])
            self._answer_publishes(session, codec, inflight)

    def _answer_publishes(self, session: Session, codec: Codec, inflight: _Inflight) -> None:
        """Send the replies of the finished publishes at the head of ``inflight``, in order."""
        while inflight and inflight[0][0].done():
            task, request, size = inflight.pop(0)
            inflight.size -= size
            if task.cancelled():  # The node is shutting down: nobody to answer.
                continue
            exc = task.exception()
            if exc is None:
                publication = task.result()
                out = codec.published(request.room, publication.offset, publication.epoch,
                                      request.id)
                if out is not None:  # With the next flush: a burst's acks share a write.
                    session.send_soon(out)
            elif not self._refused(session, codec, exc, request.id):
                # As an exception out of the loop would (handle): logged, closed with 1011.
                log.error("handler crashed", exc_info=exc)
                self.metrics.errors.labels(code=ErrorCode.INTERNAL).inc()
                session.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _refused(self, session: Session, codec: Codec, exc: BaseException, rid: Any) -> bool:
        """Answer a request the service refused (ProtocolError) or could not serve now
        (BrokerUnavailable); False for any other exception, which is not the client's."""
        if isinstance(exc, ProtocolError):
            self.metrics.errors.labels(code=exc.code).inc()
            error_id = exc.request_id if exc.request_id is not None else rid
            session.send(codec.error(exc.code, exc.message, error_id, **exc.extra))
            return True
        if isinstance(exc, BrokerUnavailable):
            self.metrics.errors.labels(code=ErrorCode.UNAVAILABLE).inc()
            session.send(codec.error(ErrorCode.UNAVAILABLE, UNAVAILABLE_TEXT, rid))
            return True
        return False

    async def _execute(self, session: Session, codec: Codec, request: Request) -> None:
        """One request, one service call; the outcome is encoded by the session's codec."""
        service = self.service
        out: bytes | None = None
        match request:
            case envelopes.Join(room, rid, since, nick, token):
                def reply(joined: Joined) -> None:
                    answer = codec.joined(room, rid, **_position(joined, since is not None))
                    if answer is not None:
                        session.send(answer)

                await service.join(session, room, nick=nick, since=since, reply=reply,
                                   token=token)
            case envelopes.Leave(room, rid):
                await service.leave(session, room)
                out = codec.left(room, rid)
            case envelopes.Typing(room):
                await service.typing(session, room)
            case envelopes.Ping(rid):
                out = codec.pong(rid)
            case envelopes.Presence(room, rid):
                members = await service.presence(session, room)
                out = codec.presence(room, [m.to_dict() for m in members], rid)
            case envelopes.History(room, limit, since, rid):
                result = await service.history(session, room, since, limit)
                # At most --max-reply-size per reply; the client pages on with since.
                messages, more = envelopes.history_page(result.messages,
                                                        self.config.max_reply_size)
                out = codec.history(room, messages, result.offset, result.epoch, rid,
                                    result.recovered if since is not None else None, more)
            case envelopes.Refresh(token, rid):
                out = await self._refresh(session, codec, token, rid)
            case envelopes.Connect(_, rid):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "already connected", rid)
        if out is not None:
            session.send(out)

    async def _admitted(self, session: Session, codec: Codec,
                        inflight: _Inflight) -> AsyncIterator[str | bytes]:
        """The client's messages that passed the rate limit when they arrived (their verdicts
        queue beside them, AdmittedConnection); ends once a flooder has been closed."""
        ws = session.ws
        assert isinstance(ws, AdmittedConnection)
        verdicts = ws.verdicts
        async for frame in ws:
            verdict = verdicts.pop(0)
            if ws.flooded:  # Closed for a flood of control frames: serve nothing more.
                break
            if verdict.allowed:
                yield frame
                continue
            if verdict.quiet and not verdict.flood:
                self.metrics.typing_dropped.inc()  # A typing frame over its budget: dropped.
                continue
            self.metrics.errors.labels(code=ErrorCode.RATE_LIMITED).inc()
            if verdict.flood:
                ws.close_flooding()
                break
            if inflight:  # Answered in its place: after the publishes read before it.
                await self._settle(session, codec, inflight, 0)
            # The refused frame is parsed only for its id, so the client can match the refusal.
            session.send(codec.error(ErrorCode.RATE_LIMITED, RATE_LIMITED_TEXT, request_id(frame),
                                     retry_after_ms=verdict.retry_after_ms))
        # After a flood close: return once the connection is gone (the close frame was sent).
        await ws.wait_closed()

    # --- openings ----------------------------------------------------------------------------

    async def _open_native(self, session: Session, codec: NativeCodec) -> bool:
        if not await self._count_user(session, codec):
            return False
        who = session.identity
        fields: dict[str, Any] = {"user_id": who.user_id, "username": who.username}
        if who.expires_at is not None:
            fields["expires_at"] = int(who.expires_at)
        if not who.authenticated:
            fields["anonymous"] = True
        session.send(envelopes.welcome(session.conn_id, self.config.node_id,
                                       session.welcome_id, **fields))
        return True

    async def _refuse_room(self, session: Session, codec: Any, exc: ProtocolError) -> None:
        """A chat-dialect client may not be in its room (unknown namespace, forbidden, full):
        the error as the dialect shows it, then 1008."""
        self.metrics.errors.labels(code=exc.code).inc()
        session.send(codec.notice(exc.message))
        await session.ws.close(CloseCode.POLICY_VIOLATION, exc.code)

    async def _refuse_unavailable(self, session: Session, codec: Any) -> None:
        """The backend is down while a compatibility client connects: say so, close 4001."""
        self.metrics.errors.labels(code=ErrorCode.UNAVAILABLE).inc()
        session.send(codec.notice("unavailable: the cluster backend is down; retry later"))
        await session.ws.close(CloseCode.BACKEND_UNAVAILABLE, "backend unavailable")

    async def _open_fastapi(self, session: Session, codec: FastApiCodec) -> bool:
        room = codec.room
        if not envelopes.valid_room(room):
            await session.ws.close(CloseCode.POLICY_VIOLATION, "invalid room name")
            return False
        if not await self._count_user(session, codec):
            return False
        try:
            joined = await self.service.join(session, room, with_position=False)
            members = await self.service.members(room)
        except ProtocolError as exc:
            await self._refuse_room(session, codec, exc)
            return False
        except BrokerUnavailable:
            await self._refuse_unavailable(session, codec)
            return False
        who = session.identity
        if joined.fresh:  # The newcomer sees its own arrival first, then who is here.
            session.send(dialects.fastapi_user_event(
                "user_joined", room, who.user_id, who.username, clock.now_ms()))
        session.send(dialects.fastapi_members(list(dict.fromkeys(m.user_id for m in members))))
        return True

    async def _open_tutorial(self, session: Session, codec: TutorialCodec) -> bool:
        room = codec.room
        ws = session.ws
        assert isinstance(ws, AdmittedConnection)
        first = dialects.parse_tutorial(await ws.recv())
        if ws.verdicts.pop(0).allowed:
            session.limiter.refund()  # The join handshake is free.
        raw = first.get("nick") if first and first.get("type") == "join" else None
        nick = dialects.clean_nick(raw, self.config.max_nick_length)
        if not nick:
            session.send(codec.notice(
                'first send {"type": "join", "nick": "..."} with a non-empty nick'))
            await session.ws.close(CloseCode.POLICY_VIOLATION, "join first")
            return False
        if not envelopes.printable(str(raw).strip()):
            session.send(codec.notice(f"nick may have {envelopes.PRINTABLE_RULE}"))
            await session.ws.close(CloseCode.POLICY_VIOLATION, "invalid nick")
            return False
        if self.config.auth == "none":
            # The tutorial has no identity: its nick is who it is, and only while this
            # connection lives (nobody may take it over, not even with the same nick).
            session.identity = Identity(nick, nick, reclaims=False)
        else:
            # The token says who it is, and its clients show nothing but the nick: the nick is
            # the token's name, whatever was asked for (else anyone could chat as "Bob").
            nick = dialects.clean_nick(session.identity.username, self.config.max_nick_length)
        if not await self._count_user(session, codec):
            return False
        try:
            await self.service.join(session, room, nick=nick, with_position=False)
            present = sorted({m.username for m in await self.service.members(room)})
        except ProtocolError as exc:
            if exc.code != ErrorCode.NICK_TAKEN:
                await self._refuse_room(session, codec, exc)
                return False
            session.send(codec.notice(f"nick {nick!r} is taken"))
            await session.ws.close(CloseCode.POLICY_VIOLATION, "nick taken")
            return False
        except BrokerUnavailable:
            await self._refuse_unavailable(session, codec)
            return False
        session.send(dialects.tutorial(
            "info", "server", f"Welcome, {nick}! {len(present)} present: {', '.join(present)}"))
        return True


def identity_of(claims: Claims) -> Identity:
    """A connection's identity from its verified token: nothing the client chose."""
    return Identity(claims.user_id, claims.name or claims.user_id, info=claims.info,
                    grants=claims.grants, expires_at=claims.expires_at)


def anonymous(conn_id: str) -> Identity:
    """An anonymous connection (--allow-anonymous): a user of its own, join rule anyone only."""
    user_id = f"anon-{conn_id[:8]}"
    return Identity(user_id, user_id, authenticated=False, reclaims=False)


def _position(joined: Joined, with_since: bool) -> dict[str, Any]:
    """The position fields of a native ``joined`` reply (none for a repeated join)."""
    if joined.position is None:
        return {}
    extra: dict[str, Any] = {"offset": joined.position.offset, "epoch": joined.position.epoch}
    if with_since:
        extra["recovered"] = joined.position.recovered
    return extra
