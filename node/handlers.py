"""Connection handlers: one coroutine per connection, one per dialect.

Every write to a client goes through ``Hub.write``: a synchronous push of ready bytes into the
connection's transport after any fan-out still pending for it. Replies, history replays and live
fan-out therefore reach a client in exactly the order the node produced them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from node import dialects, failpoints, protocol
from node.broker import BrokerUnavailable, Publication
from node.closecodes import CloseCode
from node.presence import Member
from node.protocol import ErrorCode, ProtocolError
from node.ratelimit import TokenBucket
from node.session import Session

if TYPE_CHECKING:
    from node.server import Node

log = structlog.get_logger("roomcast.conn")

MAX_IDENTITY_LENGTH = 64


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Handlers:
    """The per-connection protocol loops; shared state lives on the Node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config
        #: Every reply goes through the hub's writer: one ordered stream per connection.
        self.write = node.hub.write

    # --- entry point -------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        """Route a new connection to its dialect; close 1011 on a crash, never leak its text."""
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/":
            dialect = dialects.TUTORIAL
        elif url.path.startswith("/ws/chat/"):
            dialect = dialects.FASTAPI
        else:
            dialect = dialects.NATIVE
        user_id = query.get("user_id", "")[:MAX_IDENTITY_LENGTH]
        username = query.get("username", "")[:MAX_IDENTITY_LENGTH]
        session = Session(
            ws=ws,
            user_id=user_id,
            username=username,
            dialect=dialect,
            limiter=TokenBucket(self.config.rate_limit, self.config.rate_burst),
            peer=self.node.client_address(ws),
        )
        if not session.user_id:
            session.user_id = f"anon-{session.conn_id[:8]}"
        session.username = session.username or session.user_id
        structlog.contextvars.bind_contextvars(conn_id=session.conn_id, dialect=dialect)
        self.node.register(session)
        log.info("connection opened", peer=session.peer, user_id=session.user_id)
        code: int | None = None
        try:
            if dialect == dialects.NATIVE:
                await self.native(session)
            elif dialect == dialects.FASTAPI:
                await self.fastapi(session, url.path[len("/ws/chat/"):])
            else:
                await self.tutorial(session)
        except ConnectionClosed:
            pass
        except Exception:
            # Task boundary: a bug closes this connection only. The text stays in the log.
            log.error("handler crashed", exc_info=True)
            self.node.metrics.errors.labels(code="internal").inc()
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            await self.node.unregister(session)
            # The code this node sent when it closed (1008, 1009, 1012...), else the client's.
            sent = ws.protocol.close_sent
            node_closed = sent is not None and not ws.protocol.close_rcvd_then_sent
            code = sent.code if sent is not None and node_closed else ws.close_code
            self.node.metrics.closes.labels(code=str(code)).inc()
            log.info("connection closed", code=code, reason=ws.close_reason)
            structlog.contextvars.clear_contextvars()

    # --- shared steps ------------------------------------------------------------------------

    async def admit(self, session: Session, frame: str | bytes) -> bool:
        """Charge one message to the rate limit; answer a refusal, close a flooder with 1008."""
        limiter = session.limiter
        if limiter.allow():
            return True
        self.node.metrics.errors.labels(code=ErrorCode.RATE_LIMITED).inc()
        if limiter.rejected_in_a_row >= self.config.flood_close_after:
            log.info("closing flooding client", refused=limiter.rejected_in_a_row)
            await session.ws.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
            return False
        retry = limiter.retry_after_ms()
        if session.dialect == dialects.NATIVE:
            # The refused frame is parsed only for its id, so the client can match the refusal.
            self.write(session, protocol.error(
                ErrorCode.RATE_LIMITED, "too many messages; slow down", _request_id(frame),
                retry_after_ms=retry,
            ))
        else:
            self.dialect_error(session, f"rate limited; retry after {retry} ms")
        return False

    async def admitted(self, session: Session) -> AsyncIterator[str | bytes]:
        """The client's frames that pass the rate limit; ends once a flooder has been closed."""
        async for frame in session.ws:
            if await self.admit(session, frame):
                yield frame
            elif session.ws.close_code is not None:
                return

    def dialect_error(self, session: Session, text: str) -> None:
        """An error in the shape the session's compatibility dialect uses."""
        if session.dialect == dialects.TUTORIAL:
            self.write(session, dialects.tutorial("error", "server", text))
        else:
            self.write(session, dialects.fastapi_error(text))

    async def refuse_unavailable(self, session: Session) -> None:
        """The backend is down while a compat client connects: say so, close 1013."""
        self.node.metrics.errors.labels(code=ErrorCode.UNAVAILABLE).inc()
        self.dialect_error(session, "unavailable: the cluster backend is down; retry later")
        await session.ws.close(CloseCode.TRY_AGAIN_LATER, "backend unavailable")

    def member(self, session: Session, nick: str | None = None) -> Member:
        return Member(
            session.user_id, session.username, self.node.node_id, session.conn_id,
            now_ms(), nick,
        )

    async def enter(self, session: Session, room: str, nick: str | None = None) -> bool:
        """Record presence and announce a newly present user; True when the user is new."""
        fresh = await self.node.presence.add(room, self.member(session, nick))
        if fresh:
            await self.node.broker.publish_event(
                room,
                protocol.event(
                    "user_joined", room, user_id=session.user_id,
                    username=session.username, ts=now_ms(),
                ),
                origin=session.conn_id,
            )
        return fresh

    async def leave_room(self, session: Session, room: str) -> None:
        nick = session.rooms.pop(room, None)
        self.node.hub.leave(room, session)
        await self.node.presence.remove(room, self.member(session, nick))

    async def publish(self, session: Session, room: str, data: Any) -> Publication:
        failpoints.crash_on_data(data)
        prefix = protocol.message_prefix(
            room, data, protocol.sender(session.user_id, session.username), now_ms()
        )
        publication = await self.node.broker.publish(room, prefix, session.conn_id)
        self.node.metrics.publications.inc()
        return publication

    # --- native protocol ---------------------------------------------------------------------

    async def native(self, session: Session) -> None:
        self.write(session, protocol.welcome(session.conn_id, self.node.node_id))
        async for frame in self.admitted(session):
            try:
                request = protocol.parse_request(frame)
                self.node.metrics.messages_in.labels(type=type(request).__name__.lower()).inc()
                await self.native_request(session, request)
            except ProtocolError as exc:
                self.node.metrics.errors.labels(code=exc.code).inc()
                self.write(session, protocol.error_from(exc))
            except BrokerUnavailable:
                self.node.metrics.errors.labels(code=ErrorCode.UNAVAILABLE).inc()
                self.write(session, protocol.error(
                    ErrorCode.UNAVAILABLE,
                    "the cluster backend is unavailable; nothing was done, retry later",
                    _request_id(frame),
                ))

    async def native_request(self, session: Session, request: protocol.Request) -> None:
        match request:
            case protocol.Publish(room, data, rid):
                publication = await self.publish(session, room, data)
                if rid is not None:
                    self.write(session, protocol.published(
                        room, publication.offset, publication.epoch, rid
                    ))
            case protocol.Join():
                await self.native_join(session, request)
            case protocol.Leave(room, rid):
                if room not in session.rooms:
                    raise ProtocolError(ErrorCode.NOT_JOINED, "not in this room", rid)
                await self.leave_room(session, room)
                self.write(session, protocol.left(room, rid))
            case protocol.Typing(room, rid):
                await self.node.broker.publish_event(
                    room,
                    protocol.event(
                        "typing", room,
                        **{"from": protocol.sender(session.user_id, session.username)},
                    ),
                    origin=session.conn_id,
                )
            case protocol.Ping(rid):
                self.write(session, protocol.pong(rid))
            case protocol.Presence(room, rid):
                members = await self.node.presence.members(room)
                self.write(session, protocol.presence_reply(
                    room, [m.to_dict() for m in members], rid
                ))
            case protocol.History(room, limit, since, rid):
                result = await self.node.broker.history(room, since, limit)
                self.write(session, protocol.history_reply(
                    room, result.messages, result.offset, result.epoch, rid,
                    recovered=result.recovered if since is not None else None,
                ))

    async def native_join(self, session: Session, request: protocol.Join) -> None:
        room, rid = request.room, request.id
        if room in session.rooms:
            self.write(session, protocol.joined(room, rid))
            return
        if len(session.rooms) >= self.config.max_rooms_per_connection:
            raise ProtocolError(
                ErrorCode.TOO_MANY_ROOMS,
                f"at most {self.config.max_rooms_per_connection} rooms per connection", rid,
            )
        nick = request.nick[: self.config.max_nick_length].strip() if request.nick else None
        if nick is not None and not await self.node.presence.claim_nick(
            room, nick, self.member(session, nick)
        ):
            raise ProtocolError(ErrorCode.NICK_TAKEN, "that nick is in use in this room", rid)
        hub = self.node.hub
        # Subscribed before the position is read, so nothing published after it can be missed;
        # live publications queue until the replay below is written.
        session.rooms[room] = nick
        try:
            await hub.join(room, session, replaying=True)
            result = await self.node.broker.history(
                room, request.since, None if request.since else 1
            )
            await self.enter(session, room, nick)
        except BaseException:
            await self.leave_room(session, room)
            raise
        # From here to the end: no await, so no publication can slip between replay and live.
        extra: dict[str, Any] = {"offset": result.offset, "epoch": result.epoch}
        if request.since is not None:
            extra["recovered"] = result.recovered
        self.write(session, protocol.joined(room, rid, **extra))
        if request.since is not None and result.recovered:
            for payload in result.messages:
                self.write(session, payload)
        for publication in hub.finish_replay(room, session):
            if publication.offset == 0:
                if publication.origin != session.conn_id:
                    self.write(session, publication.payload)
            elif publication.epoch != result.epoch or publication.offset > result.offset:
                self.write(session, publication.payload)

    # --- FastAPI chat tutorial dialect ---------------------------------------------------------

    async def fastapi(self, session: Session, room: str) -> None:
        if not protocol.valid_room(room):
            await session.ws.close(CloseCode.POLICY_VIOLATION, "invalid room name")
            return
        session.rooms[room] = None
        try:
            await self.node.hub.join(room, session)
            fresh = await self.enter(session, room)
            members = await self.node.presence.members(room)
        except BrokerUnavailable:
            await self.refuse_unavailable(session)
            return
        if fresh:  # The newcomer sees its own arrival first, then who is here.
            self.write(session, dialects.fastapi_user_event(
                "user_joined", room, session.user_id, session.username, now_ms()
            ))
        user_ids = list(dict.fromkeys(m.user_id for m in members))
        self.write(session, dialects.fastapi_members(user_ids))
        async for frame in self.admitted(session):
            if isinstance(frame, bytes):
                self.dialect_error(session, "binary frames are not accepted; send text")
                continue
            action = dialects.parse_fastapi(frame)
            self.node.metrics.messages_in.labels(type=type(action).__name__.lower()).inc()
            try:
                match action:
                    case dialects.Say(content):
                        await self.publish(session, room, content)
                    case dialects.Typing():
                        await self.node.broker.publish_event(
                            room,
                            protocol.event("typing", room, **{"from": protocol.sender(
                                session.user_id, session.username)}),
                            origin=session.conn_id,
                        )
                    case dialects.Ping():
                        self.write(session, b'{"type":"pong"}')
                    case dialects.Unknown(kind):
                        self.dialect_error(session, f"unknown message type {kind!r}")
            except BrokerUnavailable:
                self.node.metrics.errors.labels(code=ErrorCode.UNAVAILABLE).inc()
                self.dialect_error(
                    session, "unavailable: the cluster backend is down; message not sent")

    # --- python-websockets tutorial dialect ----------------------------------------------------

    async def tutorial(self, session: Session) -> None:
        room = self.config.tutorial_room
        first = dialects.parse_tutorial(await session.ws.recv())
        nick = dialects.clean_nick(
            first.get("nick") if first and first.get("type") == "join" else None,
            self.config.max_nick_length,
        )
        if not nick:
            self.dialect_error(
                session, 'first send {"type": "join", "nick": "..."} with a non-empty nick')
            await session.ws.close(CloseCode.POLICY_VIOLATION, "join first")
            return
        session.user_id = session.username = nick
        try:
            if not await self.node.presence.claim_nick(room, nick, self.member(session, nick)):
                self.write(session, dialects.tutorial("error", "server", f"nick {nick!r} is taken"))
                await session.ws.close(CloseCode.POLICY_VIOLATION, "nick taken")
                return
            session.rooms[room] = nick
            await self.node.hub.join(room, session)
            await self.enter(session, room, nick)
            present = sorted({m.username for m in await self.node.presence.members(room)})
        except BrokerUnavailable:
            await self.refuse_unavailable(session)
            return
        self.write(session, dialects.tutorial(
            "info", "server",
            f"Welcome, {nick}! {len(present)} present: {', '.join(present)}",
        ))
        async for frame in self.admitted(session):
            message = None if isinstance(frame, bytes) else dialects.parse_tutorial(frame)
            if message is None or message.get("type") != "chat":
                self.write(session, dialects.tutorial(
                    "error", "server", "expected {\"type\": \"chat\", \"text\": \"...\"}"))
                continue
            text = message.get("text")
            if not isinstance(text, str):
                self.write(session, dialects.tutorial("error", "server", "text must be a string"))
                continue
            text = text[: self.config.max_chat_length]
            try:
                await self.publish(session, room, text)
            except BrokerUnavailable:
                self.write(session, dialects.tutorial(
                    "error", "server", "unavailable: message not sent, retry later"))


def _request_id(frame: str | bytes) -> Any:
    """The id of a request, best effort, for an error envelope about a frame not served."""
    if isinstance(frame, bytes | bytearray | memoryview):
        return None
    try:
        obj = protocol.decode_json(frame)
    except ProtocolError:
        return None
    return obj.get("id") if isinstance(obj, dict) else None
