"""The WebSocket endpoint: one loop for every dialect, over the service layer.

A connection is routed by path to a codec (protocol/codecs.py): ``/ws`` native, ``/ws/chat/{room}``
the FastAPI tutorial, ``/`` the python-websockets tutorial. After the dialect's opening (a welcome,
an automatic join, a nick handshake), every frame goes through the same steps: the rate limit,
``codec.decode`` into a request, one call on the ``Service``, ``codec`` to encode the outcome. An
error is mapped to the dialect's error shape here, once. Every write to a client goes through
``Session.send``: a synchronous push into the connection after any fan-out still pending for it,
so that replies, history replays and live fan-out reach a client in the order the node made them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

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
from roomcast.service.connection import Identity
from roomcast.service.ratelimit import TokenBucket
from roomcast.service.service import Joined, Service
from roomcast.transports.session import Session, new_conn_id
from roomcast.transports.writer import FrameWriter

log = structlog.get_logger("roomcast.conn")

MAX_IDENTITY_LENGTH = 64
FASTAPI_PREFIX = "/ws/chat/"


def is_websocket_route(path: str) -> bool:
    return path in ("/", "/ws") or path.startswith(FASTAPI_PREFIX)


def client_address(ws: ServerConnection, trusted: tuple[str, ...]) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy, in which case
    X-Forwarded-For is walked from the right past every trusted proxy (CDN -> nginx -> node);
    anything left of the first untrusted hop may be forged and is ignored."""
    address = str(ws.remote_address[0]) if ws.remote_address else ""
    if address not in trusted or ws.request is None:
        return address
    hops = [h.strip() for h in ws.request.headers.get("X-Forwarded-For", "").split(",")]
    for hop in reversed([h for h in hops if h]):
        address = hop
        if hop not in trusted:
            break
    return address


def request_id(frame: str | bytes) -> Any:
    """The id of a request, best effort, for an error envelope about a frame not served."""
    if isinstance(frame, bytes | bytearray | memoryview):
        return None
    try:
        obj = envelopes.decode_json(frame)
    except ProtocolError:
        return None
    return obj.get("id") if isinstance(obj, dict) else None


Opening = Callable[[Session, Any], Awaitable[bool]]


class WebSocketEndpoint:
    """``handle`` is the websockets connection handler of the node's client port."""

    def __init__(
        self, config: Config, service: Service, writer: FrameWriter, metrics: Metrics
    ) -> None:
        self.config = config
        self.service = service
        self.writer = writer
        self.metrics = metrics

    # --- entry point -------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        """Route a new connection to its dialect; close 1011 on a crash, never leak its text."""
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        codec: Any
        opening: Opening
        if url.path == "/":
            codec = TutorialCodec(self.config.tutorial_room, self.config.max_chat_length)
            opening = self._open_tutorial
        elif url.path.startswith(FASTAPI_PREFIX):
            codec, opening = FastApiCodec(url.path[len(FASTAPI_PREFIX):]), self._open_fastapi
        else:
            codec, opening = NativeCodec(), self._open_native
        conn_id = new_conn_id()
        user_id = query.get("user_id", "")[:MAX_IDENTITY_LENGTH] or f"anon-{conn_id[:8]}"
        username = query.get("username", "")[:MAX_IDENTITY_LENGTH] or user_id
        session = Session(
            ws=ws, writer=self.writer, identity=Identity(user_id, username), codec=codec.name,
            limiter=TokenBucket(self.config.rate_limit, self.config.rate_burst),
            conn_id=conn_id, peer=client_address(ws, self.config.trusted_proxies),
        )
        structlog.contextvars.bind_contextvars(conn_id=conn_id, dialect=codec.name)
        self.service.connected(session)
        self.metrics.connections.labels(dialect=codec.name).inc()
        log.info("connection opened", peer=session.peer, user_id=user_id)
        try:
            if await opening(session, codec):
                await self._serve(session, codec)
        except ConnectionClosed:
            pass
        except Exception:
            # Task boundary: a bug closes this connection only. The text stays in the log.
            log.error("handler crashed", exc_info=True)
            self.metrics.errors.labels(code=ErrorCode.INTERNAL).inc()
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
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
        async for frame in self._admitted(session, codec):
            rid = None
            try:
                request = codec.decode(frame)
                rid = request.id
                self.metrics.messages_in.labels(type=type(request).__name__.lower()).inc()
                await self._execute(session, codec, request)
            except ProtocolError as exc:
                self.metrics.errors.labels(code=exc.code).inc()
                error_id = exc.request_id if exc.request_id is not None else rid
                session.send(codec.error(exc.code, exc.message, error_id, **exc.extra))
            except BrokerUnavailable:
                self.metrics.errors.labels(code=ErrorCode.UNAVAILABLE).inc()
                session.send(codec.error(ErrorCode.UNAVAILABLE, UNAVAILABLE_TEXT, rid))

    async def _execute(self, session: Session, codec: Codec, request: Request) -> None:
        """One request, one service call; the outcome is encoded by the session's codec."""
        service = self.service
        out: bytes | None = None
        match request:
            case envelopes.Publish(room, data, rid):
                publication = await service.publish(session, room, data)
                out = codec.published(room, publication.offset, publication.epoch, rid)
            case envelopes.Join(room, rid, since, nick):
                def reply(joined: Joined) -> None:
                    answer = codec.joined(room, rid, **_position(joined, since is not None))
                    if answer is not None:
                        session.send(answer)

                await service.join(session, room, nick=nick, since=since, reply=reply)
            case envelopes.Leave(room, rid):
                await service.leave(session, room)
                out = codec.left(room, rid)
            case envelopes.Typing(room):
                await service.typing(session, room)
            case envelopes.Ping(rid):
                out = codec.pong(rid)
            case envelopes.Presence(room, rid):
                members = await service.presence(room)
                out = codec.presence(room, [m.to_dict() for m in members], rid)
            case envelopes.History(room, limit, since, rid):
                result = await service.history(room, since, limit)
                out = codec.history(room, result.messages, result.offset, result.epoch, rid,
                                    result.recovered if since is not None else None)
        if out is not None:
            session.send(out)

    async def _admitted(self, session: Session, codec: Codec) -> AsyncIterator[str | bytes]:
        """The client's frames that pass the rate limit; ends once a flooder has been closed."""
        limiter = session.limiter
        async for frame in session.ws:
            if limiter.allow():
                yield frame
                continue
            self.metrics.errors.labels(code=ErrorCode.RATE_LIMITED).inc()
            if limiter.rejected_in_a_row >= self.config.flood_close_after:
                log.info("closing flooding client", refused=limiter.rejected_in_a_row)
                await session.ws.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
                return
            # The refused frame is parsed only for its id, so the client can match the refusal.
            session.send(codec.error(ErrorCode.RATE_LIMITED, RATE_LIMITED_TEXT, request_id(frame),
                                     retry_after_ms=limiter.retry_after_ms()))

    # --- openings ----------------------------------------------------------------------------

    async def _open_native(self, session: Session, codec: NativeCodec) -> bool:
        session.send(envelopes.welcome(session.conn_id, self.config.node_id))
        return True

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
        try:
            joined = await self.service.join(session, room, with_position=False)
            members = await self.service.presence(room)
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
        first = dialects.parse_tutorial(await session.ws.recv())
        nick = dialects.clean_nick(
            first.get("nick") if first and first.get("type") == "join" else None,
            self.config.max_nick_length,
        )
        if not nick:
            session.send(codec.notice(
                'first send {"type": "join", "nick": "..."} with a non-empty nick'))
            await session.ws.close(CloseCode.POLICY_VIOLATION, "join first")
            return False
        # The tutorial has no identity: its nick is who it is.
        session.identity = Identity(nick, nick)
        try:
            await self.service.join(session, room, nick=nick, with_position=False)
            present = sorted({m.username for m in await self.service.presence(room)})
        except ProtocolError as exc:
            if exc.code != ErrorCode.NICK_TAKEN:
                raise
            session.send(codec.notice(f"nick {nick!r} is taken"))
            await session.ws.close(CloseCode.POLICY_VIOLATION, "nick taken")
            return False
        except BrokerUnavailable:
            await self._refuse_unavailable(session, codec)
            return False
        session.send(dialects.tutorial(
            "info", "server", f"Welcome, {nick}! {len(present)} present: {', '.join(present)}"))
        return True


def _position(joined: Joined, with_since: bool) -> dict[str, Any]:
    """The position fields of a native ``joined`` reply (none for a repeated join)."""
    if joined.position is None:
        return {}
    extra: dict[str, Any] = {"offset": joined.position.offset, "epoch": joined.position.epoch}
    if with_since:
        extra["recovered"] = joined.position.recovered
    return extra
