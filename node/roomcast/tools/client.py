"""An asyncio client for the native protocol: requests, events, reconnection and recovery.

``async with Client("ws://127.0.0.1:8000", user_id="u1") as client:`` connects (with ``--auth
jwt``: ``Client(url, token=...)``, a token or a function that returns a fresh one); ``join``,
``leave``, ``publish``, ``presence`` and ``history`` are requests answered by the node (matched
to their reply by an integer ``id``); ``async for event in client`` yields what the node pushes
(``message``, ``typing``, ``user_joined``, ``user_left``, ...). docs/PROTOCOL.md describes every
envelope; this module adds two synthetic events, ``recovery_failed`` and ``rejoin_failed``
(see ``Client``).

The client survives its connection: after an unexpected close it reconnects with exponential
backoff and full jitter, rejoins every room it was in with ``since`` set to the last message it
delivered, and hands the application each message exactly once, in offset order. It stops for good
only on ``close()`` or a close code that ``roomcast.protocol.closecodes.should_reconnect`` calls
terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from roomcast.protocol.closecodes import should_reconnect
from roomcast.protocol.envelopes import ErrorCode, Since

# A library logs through stdlib logging: silent until the application configures it, and never
# on stdout, where `roomcast subscribe` writes its JSON lines.
log = logging.getLogger("roomcast.client")

#: A decoded JSON envelope, as received from (or sent to) the node.
Envelope = dict[str, Any]
#: A connection token, or a function (plain or async) that returns a fresh one: called for every
#: connection attempt and for every ``refresh_required``.
TokenSource = str | Callable[[], str | Awaitable[str]]

#: A connection that lived this long restarts the backoff; a shorter one counts as a failure,
#: so a node that accepts and drops at once is retried with growing delays, not in a tight loop.
STABLE_AFTER: Final = 5.0
#: Seconds to wait for ``welcome`` after the WebSocket handshake.
WELCOME_TIMEOUT: Final = 10.0
#: How often a rejoin refused with ``rate_limited`` is retried on the same connection.
REJOIN_RATE_LIMIT_RETRIES: Final = 5
#: Rejoin refusals that may clear up by themselves: reconnect later rather than forget the room.
#: (``nick_taken`` is usually our own previous connection, which the node has not yet dropped.)
RETRY_LATER_CODES: Final = frozenset(
    {ErrorCode.UNAVAILABLE, ErrorCode.NICK_TAKEN, ErrorCode.INTERNAL, ErrorCode.RATE_LIMITED}
)


# --- errors ----------------------------------------------------------------------------------


class ClientError(Exception):
    """The base of every error this module raises."""


class ConnectError(ClientError):
    """The first connection could not be opened (later ones are retried on their own)."""


class ConnectionLost(ClientError):
    """The connection dropped before the reply came: the request may or may not have been done."""


class RequestTimeout(ClientError, TimeoutError):
    """No reply (or no connection to send on) within the client's ``request_timeout``."""


class ClientClosed(ClientError):
    """The client stopped for good; ``code`` is the close code (1000 after ``close()``)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        detail = f" ({reason})" if reason else ""
        super().__init__(f"connection closed with code {code}{detail}")
        self.code = code
        self.reason = reason


class ServerError(ClientError):
    """The node answered a request with an ``error`` envelope; ``code`` is its error code."""

    def __init__(self, reply: Envelope) -> None:
        self.reply = reply
        self.code = str(reply.get("code", ""))
        self.message = str(reply.get("message", ""))
        super().__init__(f"{self.code}: {self.message}")


class RateLimited(ServerError):
    """``rate_limited``: the request was dropped unread; resend after ``retry_after_ms``."""

    @property
    def retry_after_ms(self) -> int:
        value = self.reply.get("retry_after_ms")
        return value if isinstance(value, int) and value > 0 else 1


class Unavailable(ServerError):
    """``unavailable``: the cluster backend is down and nothing was done; retry later."""


class NickTaken(ServerError):
    """``nick_taken``: another connection holds that nick in the room; the join did not happen."""


class NotJoined(ServerError):
    """``not_joined``: the connection is not in that room."""


class HistoryUnavailable(ClientError):
    """``history(since=...)`` cannot continue from ``since`` without a gap.

    ``offset`` and ``epoch`` are the room's current position: fetch again without ``since``.
    """

    def __init__(self, room: str, offset: int, epoch: str) -> None:
        super().__init__(f"history of {room!r} since that position is no longer available")
        self.room = room
        self.offset = offset
        self.epoch = epoch


_ERRORS: Final[dict[str, type[ServerError]]] = {
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.NICK_TAKEN: NickTaken,
    ErrorCode.NOT_JOINED: NotJoined,
}


def server_error(reply: Envelope) -> ServerError:
    """The exception for an ``error`` envelope: a ServerError subclass chosen by its code."""
    return _ERRORS.get(str(reply.get("code")), ServerError)(reply)


class _RetryLater(ClientError):
    """A rejoin failed in a way that a later connection may not: back off and reconnect."""


# --- pure helpers ------------------------------------------------------------------------------


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0 = the first, right after a drop).

    "Full jitter": uniform over ``[0, min(cap, base * 2**attempt)]``. Clients that lost the same
    node spread evenly over the window instead of coming back in synchronized waves
    (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/).
    """
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), 64))
    return rng.uniform(0.0, ceiling)


def retry_delay(
    failures: int, *, base: float, cap: float, max_failures: int, pause: float,
    rng: random.Random,
) -> float:
    """The wait after ``failures`` consecutive failed attempts, with a circuit breaker.

    Every ``max_failures``-th failure in a row the client pauses ``pause`` seconds instead; the
    backoff exponent then starts over. ``max_failures`` <= 0 disables the pause.
    """
    if max_failures > 0:
        if failures > 0 and failures % max_failures == 0:
            return pause
        failures %= max_failures
    return backoff_delay(failures, base, cap, rng)


def native_url(url: str, user_id: str | None = None, username: str | None = None) -> str:
    """The native endpoint for ``url``, with the identity in its query string.

    ``http(s)://`` becomes ``ws(s)://``; an empty path or ``/`` becomes ``/ws`` (on ``/`` a node
    speaks the python-websockets tutorial dialect instead). Raises ValueError for other schemes.
    """
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("user_id", "username")]
    if user_id:
        query.append(("user_id", user_id))
    if username:
        query.append(("username", username))
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


# --- connection state ------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _RoomState:
    """A joined room: the last message position handed to the application, and the nick."""

    offset: int = 0
    epoch: str | None = None  # None: position unknown, rejoin without since
    nick: str | None = None


@dataclass(eq=False, slots=True)
class _Request:
    body: Envelope
    future: asyncio.Future[Envelope]
    rejoin: bool = False  # sent by the client itself after a reconnect


@dataclass(eq=False)
class _Connection:
    """One WebSocket connection and the requests waiting for a reply on it."""

    ws: ClientConnection
    conn_id: str
    node_id: str
    opened_at: float
    #: id -> request, in the order sent (dicts keep insertion order).
    pending: dict[int, _Request] = field(default_factory=dict)
    #: The last ``reconnect`` envelope: the node is about to close with 1012.
    hint: Envelope | None = None
    #: Rooms whose ``joined`` reply arrived on this connection.
    joined: set[str] = field(default_factory=set)
    reader: asyncio.Task[None] | None = None
    #: The answer to the last ``refresh_required``, under way.
    refresher: asyncio.Task[None] | None = None
    lost: bool = False
    close_code: int | None = None
    close_reason: str = ""


class Client:
    """A native-protocol client that reconnects and resumes on its own.

    Requests (``join``, ``leave``, ``publish``, ``presence``, ``history``) wait for the connection
    while it is being re-established, then for their reply, for at most ``request_timeout``
    seconds in all (RequestTimeout). An ``error`` reply raises a ServerError subclass carrying its
    ``code``. A connection that drops under a request raises ConnectionLost for ``publish`` (it may
    have been stored; resending could duplicate it); the idempotent requests are sent again.

    Events: iterate the client. ``message`` envelopes come once each, in offset order per room:
    the client tracks per room the (offset, epoch) of the last message it handed over and drops
    any message at or below it in the same epoch. After a reconnect it rejoins each room with
    ``since`` = that position; when the node cannot fill the gap the client yields
    ``{"type": "recovery_failed", "room": ..., "offset": ..., "epoch": ...}`` (the room's new
    position, from which delivery continues); when the node itself lost messages that history no
    longer has, it sends ``{"type": "gap", "room": ..., "recovered": false, "offset": ...,
    "epoch": ...}``, which the client yields after moving the room's position there. A rejoin
    refused for good (e.g. ``too_many_rooms``)
    yields ``{"type": "rejoin_failed", "room": ..., "code": ..., "message": ...}`` and the room is
    forgotten. Events wait in a queue of ``max_queue``; when it is full the client stops reading
    the socket (and so stops seeing replies too) until the application takes an event: iterate
    the client whenever you are in a room.

    Reconnection: after any close that ``should_reconnect`` allows, the client waits
    ``uniform(0, min(backoff_cap, backoff_base * 2**attempt))`` seconds before each attempt, and
    ``pause`` seconds after every ``max_failures_before_pause`` failures in a row (a connection
    that lasted less than STABLE_AFTER seconds counts as a failure too). A ``reconnect`` envelope
    before the close replaces the first wait by its ``retry_after_ms``. A terminal close
    (1000, 1008, 1009, ...) ends iteration with ClientClosed carrying the code, and fails every
    request from then on. ``close()`` ends iteration normally.

    Heartbeat: websockets pings every ``ping_interval`` seconds; a peer that does not answer
    within ``ping_timeout`` is given ``close_timeout`` more to complete a closing handshake, then
    dropped, and the client reconnects. A silent dead connection is thus noticed at most
    ``ping_interval + ping_timeout + close_timeout`` seconds after it died.
    """

    def __init__(
        self,
        url: str,
        *,
        user_id: str | None = None,
        username: str | None = None,
        token: TokenSource | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_failures_before_pause: int = 10,
        pause: float = 60.0,
        ping_interval: float | None = 20,
        ping_timeout: float | None = 20,
        close_timeout: float = 2.0,
        request_timeout: float = 10.0,
        max_queue: int = 1024,
        rng: random.Random | None = None,
    ) -> None:
        self.url = native_url(url, user_id, username)
        #: Sent as ``Authorization: Bearer`` on every connection (docs/PROTOCOL.md section 12).
        self.token = token
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_failures_before_pause = max_failures_before_pause
        self.pause = pause
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        self.request_timeout = request_timeout
        self.max_queue = max(1, max_queue)
        self.rng = rng if rng is not None else random.Random()
        #: From the current connection's ``welcome`` (None before the first connect).
        self.conn_id: str | None = None
        self.node_id: str | None = None
        #: Connections re-established after a drop.
        self.reconnects = 0
        #: Connection attempts that failed (refused, failed handshake, no welcome).
        self.failed_connects = 0
        self._rooms: dict[str, _RoomState] = {}
        self._conn: _Connection | None = None
        self._ready = asyncio.Event()  # set: _conn is usable by application requests
        # Unbounded as a container so that the end marker always fits; _enqueue bounds events.
        self._events: asyncio.Queue[Envelope | None] = asyncio.Queue()
        self._space = asyncio.Event()
        self._ids = itertools.count(1)
        self._supervisor: asyncio.Task[None] | None = None
        self._failures = 0
        self._closing = False
        self._ended = False
        self._end_error: ClientError | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the first connection and read its ``welcome``; raise ConnectError if it fails.

        Only this first attempt raises: once connected, the client reconnects on its own.
        """
        if self._supervisor is not None:
            raise ClientError("connect() may be called once")
        conn = await self._open()
        self._ready.set()
        self._supervisor = asyncio.create_task(self._supervise(conn), name="roomcast-client")

    async def close(self) -> None:
        """Close the connection with 1000 and stop reconnecting. Idempotent.

        Iteration then ends (after the events already queued); requests raise ClientClosed.
        """
        self._closing = True
        if self._conn is not None:
            await self._shutdown(self._conn)
        task = self._supervisor
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        if self._conn is not None:  # opened by a reconnect that the cancel interrupted
            await self._shutdown(self._conn)
        self._finish(None)

    @property
    def connected(self) -> bool:
        """True while a connection is open and its rooms are rejoined."""
        return self._conn is not None and self._ready.is_set() and not self._ended

    @property
    def rooms(self) -> dict[str, Since | None]:
        """Joined rooms and the position of the last message delivered (None: not known)."""
        return {
            room: None if state.epoch is None else Since(state.offset, state.epoch)
            for room, state in self._rooms.items()
        }

    def drop_connection(self) -> None:
        """Abort the socket without a close frame, as a network failure would.

        For tests and failure drills: the client notices at once, reconnects and recovers.
        """
        if self._conn is not None:
            self._conn.ws.transport.abort()

    # --- requests ----------------------------------------------------------------------------

    async def join(
        self, room: str, nick: str | None = None, *, since: Since | None = None
    ) -> Envelope:
        """Join ``room`` and return the ``joined`` reply.

        The room is remembered as soon as the node confirms (before this returns) and rejoined
        after every reconnect. With ``since``, the node first replays the messages after it; if
        it cannot, a ``recovery_failed`` event is queued. Raises NickTaken, ServerError, ...
        """
        body: Envelope = {"type": "join", "room": room}
        if nick is not None:
            body["nick"] = nick
        if since is not None:
            body["since"] = {"offset": since.offset, "epoch": since.epoch}
        return await self._request(body, retry=True)

    async def leave(self, room: str) -> None:
        """Leave ``room``; it is forgotten at once, so a reconnect does not rejoin it."""
        self._rooms.pop(room, None)
        with contextlib.suppress(NotJoined):
            await self._request({"type": "leave", "room": room}, retry=True)

    async def publish(self, room: str, data: Any) -> int:
        """Publish ``data`` (any JSON value) to ``room``; return the offset the node gave it.

        Raises RateLimited, Unavailable, ..., or ConnectionLost when the connection dropped
        after sending (not resent: it may have been stored).
        """
        return int((await self.publish_ack(room, data))["offset"])

    async def publish_ack(self, room: str, data: Any) -> Envelope:
        """Like ``publish``, but return the whole ``published`` ack (``offset`` and ``epoch``)."""
        return await self._request({"type": "publish", "room": room, "data": data}, retry=False)

    async def presence(self, room: str) -> list[dict[str, Any]]:
        """Every connection in ``room``, cluster-wide, oldest first (membership not needed)."""
        reply = await self._request({"type": "presence", "room": room}, retry=True)
        return list(reply.get("members", []))

    async def history(
        self, room: str, limit: int | None = None, since: Since | None = None
    ) -> list[Envelope]:
        """Stored ``message`` envelopes of ``room``, oldest first.

        Without ``since``: the newest ``limit`` (all kept without it). With ``since``: those after
        it, at most ``limit``; HistoryUnavailable when the node no longer has all of them.
        """
        body: Envelope = {"type": "history", "room": room}
        if limit is not None:
            body["limit"] = limit
        if since is not None:
            body["since"] = {"offset": since.offset, "epoch": since.epoch}
        try:
            reply = await self._request(body, retry=True)
        except ServerError as exc:
            # Older nodes answer an unrecoverable `since` with bad_request plus the position.
            if since is not None and "offset" in exc.reply and "epoch" in exc.reply:
                raise HistoryUnavailable(
                    room, int(exc.reply["offset"]), str(exc.reply["epoch"])
                ) from None
            raise
        if reply.get("recovered") is False:
            raise HistoryUnavailable(room, int(reply["offset"]), str(reply["epoch"]))
        return list(reply.get("messages", []))

    # --- events ------------------------------------------------------------------------------

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Envelope:
        """The next event; StopAsyncIteration after close(), ClientClosed after a terminal close."""
        item = await self._events.get()
        self._space.set()
        if item is None:
            self._events.put_nowait(None)  # Keep the end visible to every later call.
            if self._end_error is not None:
                raise self._end_error
            raise StopAsyncIteration
        return item

    async def _enqueue(self, event: Envelope) -> None:
        while self._events.qsize() >= self.max_queue:
            self._space.clear()
            await self._space.wait()
        self._events.put_nowait(event)

    # --- request plumbing --------------------------------------------------------------------

    async def _request(self, body: Envelope, *, retry: bool) -> Envelope:
        """Send ``body`` with a fresh id once connected; return the reply or raise its error."""
        try:
            async with asyncio.timeout(self.request_timeout):
                while True:
                    conn = await self._usable()
                    try:
                        return await self._exchange(conn, body)
                    except ConnectionLost:
                        if not retry:
                            raise
        except TimeoutError:
            raise RequestTimeout(
                f"no reply to {body['type']} within {self.request_timeout} s"
            ) from None

    async def _usable(self) -> _Connection:
        """The current connection once it is ready for application requests."""
        while True:
            if self._ended:
                raise self._end_error or ClientClosed(1000, "closed by the client")
            if self._closing:
                raise ClientClosed(1000, "closed by the client")
            if self._supervisor is None:
                raise ClientError("not connected: use `async with Client(...)` or connect()")
            conn = self._conn
            if conn is not None and not conn.lost and self._ready.is_set():
                return conn
            await self._ready.wait()

    async def _exchange(
        self, conn: _Connection, body: Envelope, *, rejoin: bool = False
    ) -> Envelope:
        """Send one request on ``conn`` and wait for its reply (no timeout of its own)."""
        if conn.lost:
            raise ConnectionLost("the connection dropped before the request was sent")
        request_id = next(self._ids)
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        conn.pending[request_id] = _Request(body, future, rejoin)
        try:
            await conn.ws.send(orjson.dumps({**body, "id": request_id}), text=True)
        except ConnectionClosed:
            conn.pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # Retrieved here: the caller gets ConnectionLost below.
            raise ConnectionLost("the connection dropped before the request was sent") from None
        # A timed-out request stays in `pending`: its late reply must still be matched (and
        # ignored), or an id-less rate_limited error would be blamed on the wrong request.
        return await future

    # --- reading -----------------------------------------------------------------------------

    async def _read(self, conn: _Connection) -> None:
        """Task: dispatch every frame of one connection until it closes."""
        try:
            async for raw in conn.ws:
                try:
                    envelope = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    log.warning("ignoring a frame that is not JSON")
                    continue
                if not isinstance(envelope, dict):
                    continue
                for event in self._dispatch(conn, envelope):
                    await self._enqueue(event)
        except ConnectionClosed:
            pass
        except Exception:
            # Task boundary: a client bug costs this connection only; the supervisor reconnects.
            log.error("client reader crashed", exc_info=True)
            conn.ws.transport.abort()
        finally:
            self._lost(conn)

    def _dispatch(self, conn: _Connection, envelope: Envelope) -> list[Envelope]:
        """Route one envelope; return the events it gives the application (usually 0 or 1)."""
        kind = envelope.get("type")
        request_id = envelope.get("id")
        if request_id is not None:
            request = conn.pending.pop(request_id, None) if isinstance(request_id, int) else None
            if request is not None:
                return self._reply(conn, request, envelope)
        if (
            kind == "error" and request_id is None
            and envelope.get("code") == ErrorCode.RATE_LIMITED and conn.pending
        ):
            # A refused frame is answered without its id (PROTOCOL.md section 7), but the node
            # serves a connection's frames one at a time, in order, and every frame this client
            # sends expects a reply: the refusal is the oldest request still waiting.
            oldest = next(iter(conn.pending))
            return self._reply(conn, conn.pending.pop(oldest), envelope)
        if kind == "message":
            return self._message(envelope)
        if kind == "gap":
            return self._gap(envelope)
        if kind == "reconnect":
            conn.hint = envelope
            return []
        if kind == "welcome":
            return []
        if kind == "refresh_required" and self.token is not None:
            conn.refresher = asyncio.create_task(self._refresh(conn),
                                                 name="roomcast-client-refresh")
            return []
        return [envelope]

    async def _token(self) -> str | None:
        if self.token is None or isinstance(self.token, str):
            return self.token
        value = self.token()
        return await value if inspect.isawaitable(value) else value

    async def _refresh(self, conn: _Connection) -> None:
        """Answer ``refresh_required`` with a fresh token; a refusal is logged (the node then
        closes with 4002 and the client reconnects with the next token)."""
        try:
            token = await self._token()
            if token is None:
                return
            await self._exchange(conn, {"type": "refresh", "token": token})
        except ClientError as exc:
            log.warning("token refresh failed: %s", exc)

    def _reply(self, conn: _Connection, request: _Request, reply: Envelope) -> list[Envelope]:
        events: list[Envelope] = []
        if reply.get("type") == "error":
            if not request.future.done():
                request.future.set_exception(server_error(reply))
            return events
        if reply.get("type") == "joined":
            # Here, not in join(): the replayed and live messages right behind this reply are
            # dispatched before join()'s caller runs again, and must find the room's position.
            conn.joined.add(str(request.body["room"]))
            events = self._joined(request.body, reply, request.rejoin)
        if not request.future.done():
            request.future.set_result(reply)
        return events

    def _joined(self, body: Envelope, reply: Envelope, rejoin: bool) -> list[Envelope]:
        room = str(body["room"])
        state = self._rooms.get(room)
        if state is None:
            if rejoin:
                return []  # left while the rejoin was under way: stay forgotten
            state = self._rooms[room] = _RoomState(nick=body.get("nick"))
        offset, epoch = reply.get("offset"), reply.get("epoch")
        if not isinstance(offset, int) or not isinstance(epoch, str):
            return []  # Already in the room on this connection: position unchanged.
        since = body.get("since")
        if since is None:
            state.offset, state.epoch = offset, epoch
            return []
        if reply.get("recovered") is False:
            state.offset, state.epoch = offset, epoch
            return [{"type": "recovery_failed", "room": room, "offset": offset, "epoch": epoch}]
        # Recovered: the replay that follows starts right after `since`.
        state.offset, state.epoch = int(since["offset"]), str(since["epoch"])
        return []

    def _message(self, message: Envelope) -> list[Envelope]:
        state = self._rooms.get(str(message.get("room")))
        offset, epoch = message.get("offset"), message.get("epoch")
        if state is None or not isinstance(offset, int) or not isinstance(epoch, str):
            return [message]
        if epoch == state.epoch and offset <= state.offset:
            return []  # Already delivered (a replay overlapping what arrived live).
        state.offset, state.epoch = offset, epoch
        return [message]

    def _gap(self, gap: Envelope) -> list[Envelope]:
        """The node lost messages history no longer has: delivery continues after the gap's
        position, which becomes the room's (so that a rejoin does not ask for them again)."""
        state = self._rooms.get(str(gap.get("room")))
        offset, epoch = gap.get("offset"), gap.get("epoch")
        if state is not None and isinstance(offset, int) and isinstance(epoch, str) and (
                epoch != state.epoch or offset > state.offset):
            state.offset, state.epoch = offset, epoch
        return [gap]

    def _lost(self, conn: _Connection) -> None:
        """The connection is gone: record why and fail the requests still waiting on it."""
        conn.lost = True
        conn.close_code = conn.ws.close_code
        conn.close_reason = conn.ws.close_reason or ""
        if self._conn is conn:
            self._conn = None
            if not self._ended:
                self._ready.clear()
        error: ClientError
        if self._closing:
            error = ClientClosed(1000, "closed by the client")
        elif conn.close_code is not None and not should_reconnect(conn.close_code):
            error = ClientClosed(conn.close_code, conn.close_reason)
        else:
            error = ConnectionLost(f"connection lost (code {conn.close_code})")
        for request in conn.pending.values():
            if not request.future.done():
                request.future.set_exception(error)
        conn.pending.clear()

    # --- connecting --------------------------------------------------------------------------

    async def _open(self) -> _Connection:
        """Connect, read ``welcome`` and start the reader; raise ConnectError on any failure."""
        try:
            token = await self._token()
            ws = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {token}"} if token else None,
                compression=None,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
                # The node bounds what it sends; a history reply may hold 1000 stored messages.
                max_size=None,
                close_timeout=self.close_timeout,
            )
        except (OSError, WebSocketException, TimeoutError) as exc:
            self.failed_connects += 1
            raise ConnectError(f"cannot connect to {self.url}: {exc}") from exc
        try:
            async with asyncio.timeout(WELCOME_TIMEOUT):
                welcome = orjson.loads(await ws.recv())
            if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
                raise ConnectError(f"{self.url} did not start with a welcome envelope")
        except (ConnectionClosed, TimeoutError, orjson.JSONDecodeError) as exc:
            self.failed_connects += 1
            await ws.close()
            hint = "" if token else " (a node with --auth jwt needs a token)"
            raise ConnectError(f"no welcome from {self.url}: {exc!r}{hint}") from exc
        except BaseException:
            await ws.close()
            raise
        loop = asyncio.get_running_loop()
        conn = _Connection(ws, str(welcome.get("conn_id")), str(welcome.get("node_id")),
                           loop.time())
        self.conn_id, self.node_id = conn.conn_id, conn.node_id
        self._conn = conn
        conn.reader = asyncio.create_task(self._read(conn), name="roomcast-client-reader")
        log.info("connected to %s as %s", conn.node_id, conn.conn_id)
        return conn

    async def _shutdown(self, conn: _Connection) -> None:
        """Close ``conn`` with 1000 and wait for its reader to finish."""
        with contextlib.suppress(Exception):
            await conn.ws.close()
        if conn.reader is not None:
            if not conn.reader.done():
                await asyncio.wait([conn.reader], timeout=5)
            if not conn.reader.done():
                conn.reader.cancel()
                await asyncio.wait([conn.reader])
        self._lost(conn)

    async def _supervise(self, conn: _Connection) -> None:
        """Task: keep a connection open until close() or a terminal close code."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                assert conn.reader is not None
                await asyncio.wait([conn.reader])
                if self._closing:
                    return
                code = conn.close_code
                if code is not None and not should_reconnect(code):
                    log.info("closed for good: code %s %s", code, conn.close_reason)
                    self._finish(ClientClosed(code, conn.close_reason))
                    return
                if loop.time() - conn.opened_at >= STABLE_AFTER:
                    self._failures = 0
                else:
                    self._failures += 1
                delay = self._use_hint(conn) if conn.hint is not None else self._delay()
                log.info("connection lost (code %s); reconnecting in %.2f s", code, delay)
                conn = await self._reconnect(delay)
        except asyncio.CancelledError:
            raise
        except ClientClosed as exc:  # A terminal close while rejoining.
            log.info("closed for good: %s", exc)
            self._finish(exc)
        except Exception:
            # Task boundary: a bug ends the client with an error instead of hanging it.
            log.error("client supervisor crashed", exc_info=True)
            self._finish(ClientError("the client's connection supervisor crashed; see its log"))

    def _delay(self) -> float:
        return retry_delay(
            self._failures, base=self.backoff_base, cap=self.backoff_cap,
            max_failures=self.max_failures_before_pause, pause=self.pause, rng=self.rng,
        )

    def _use_hint(self, conn: _Connection) -> float:
        """Adopt a ``reconnect`` hint's newer positions; return its ``retry_after_ms`` in s."""
        hint = conn.hint or {}
        rooms = hint.get("rooms")
        for room, position in (rooms.items() if isinstance(rooms, dict) else ()):
            state = self._rooms.get(room)
            # A room whose join (or rejoin) was not answered yet on this connection is skipped:
            # the node's position may include messages that it never sent us.
            if state is None or room not in conn.joined or not isinstance(position, dict):
                continue
            offset, epoch = position.get("offset"), position.get("epoch")
            if not isinstance(offset, int) or not isinstance(epoch, str):
                continue
            if state.epoch is None or (epoch == state.epoch and offset > state.offset):
                state.offset, state.epoch = offset, epoch
        retry_after_ms = hint.get("retry_after_ms")
        if isinstance(retry_after_ms, int | float) and retry_after_ms >= 0:
            return float(retry_after_ms) / 1000.0
        return self._delay()

    async def _reconnect(self, delay: float) -> _Connection:
        """Wait, connect and rejoin, retrying with backoff until it works; then mark ready."""
        while True:
            await asyncio.sleep(delay)
            try:
                conn = await self._open()
                await self._rejoin(conn)
            except (ConnectError, ConnectionLost, _RetryLater) as exc:
                if self._conn is not None:
                    await self._shutdown(self._conn)
                self._failures += 1
                delay = self._delay()
                if delay == self.pause:
                    log.warning("%d reconnect attempts failed in a row; pausing %.1f s",
                                self.max_failures_before_pause, delay)
                else:
                    log.info("reconnect failed (%s); next attempt in %.2f s", exc, delay)
                continue
            self.reconnects += 1
            self._ready.set()
            log.info("reconnected to %s; %d rooms rejoined", conn.node_id, len(self._rooms))
            return conn

    async def _rejoin(self, conn: _Connection) -> None:
        """Join every remembered room again, resuming from its last delivered position."""
        rooms = list(self._rooms.items())
        results = await asyncio.gather(
            *(self._rejoin_room(conn, room, state) for room, state in rooms),
            return_exceptions=True,
        )
        for (room, _), result in zip(rooms, results, strict=True):
            if isinstance(result, ServerError):  # Refused for good: tell the application.
                self._rooms.pop(room, None)
                await self._enqueue({"type": "rejoin_failed", "room": room,
                                     "code": result.code, "message": result.message})
            elif isinstance(result, BaseException):
                raise result

    async def _rejoin_room(self, conn: _Connection, room: str, state: _RoomState) -> None:
        body: Envelope = {"type": "join", "room": room}
        if state.nick is not None:
            body["nick"] = state.nick
        if state.epoch is not None:
            body["since"] = {"offset": state.offset, "epoch": state.epoch}
        for _ in range(REJOIN_RATE_LIMIT_RETRIES):
            try:
                async with asyncio.timeout(self.request_timeout):
                    await self._exchange(conn, body, rejoin=True)
                return
            except RateLimited as exc:
                await asyncio.sleep(exc.retry_after_ms / 1000.0)
            except TimeoutError:
                raise _RetryLater(f"no reply to the rejoin of {room!r}") from None
            except ServerError as exc:
                if exc.code in RETRY_LATER_CODES:
                    raise _RetryLater(f"rejoin of {room!r} refused: {exc}") from None
                raise
        raise _RetryLater(f"rejoin of {room!r} kept being rate limited")

    def _finish(self, error: ClientError | None) -> None:
        """Stop for good (idempotent): wake waiting requests and end iteration."""
        if self._ended:
            return
        self._ended = True
        self._end_error = error
        self._ready.set()
        self._events.put_nowait(None)
