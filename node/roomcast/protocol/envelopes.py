"""The native protocol's sans-I/O core: parse client frames, build server envelopes.

No asyncio, no sockets, no Redis: every function here maps bytes or values to values and is tested
without a network (tests/unit/test_protocol.py). docs/PROTOCOL.md documents every envelope built
here. Envelopes are encoded once, with orjson, into the exact bytes that clients receive.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

import orjson

ROOM_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_ID_LENGTH: Final = 64
MAX_HISTORY_LIMIT: Final = 1000
#: The longest token a frame may carry (a JWT with a generous claim set is well under 2 KiB).
MAX_TOKEN_LENGTH: Final = 8192
#: The largest ``since.offset``: Redis stream IDs are unsigned 64-bit and the next offset is
#: asked for, so both backends answer every offset up to 2^63 - 1 alike (recovered: false).
MAX_OFFSET: Final = 2**63 - 1
#: How deep publish data may nest arrays and objects (``[[1]]`` is 2). orjson encodes at most
#: 254 levels and an envelope adds its own, so deeper data could be parsed but not sent on.
MAX_DATA_DEPTH: Final = 64
#: Unicode general categories no identifier or display name may contain: controls (NUL,
#: newlines, escapes), format characters (bidi overrides, zero-width spaces and joiners), line
#: and paragraph separators, surrogates, private use and unassigned code points.
NOT_PRINTABLE: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
PRINTABLE_RULE: Final = (
    "only printable characters: no control, format (bidi, zero-width), line or paragraph "
    "separator, surrogate, private-use or unassigned code points"
)


class ErrorCode:
    """The ``code`` values of ``error`` envelopes. PROTOCOL.md lists each with its meaning."""

    BAD_REQUEST: Final = "bad_request"
    UNKNOWN_TYPE: Final = "unknown_type"
    RATE_LIMITED: Final = "rate_limited"
    TOO_MANY_ROOMS: Final = "too_many_rooms"
    NOT_JOINED: Final = "not_joined"
    UNAVAILABLE: Final = "unavailable"
    NICK_TAKEN: Final = "nick_taken"
    INTERNAL: Final = "internal"
    FORBIDDEN: Final = "forbidden"
    UNKNOWN_NAMESPACE: Final = "unknown_namespace"
    ROOM_FULL: Final = "room_full"
    UNAUTHORIZED: Final = "unauthorized"
    TOKEN_EXPIRED: Final = "token_expired"


class ProtocolError(Exception):
    """A client request that cannot be served; becomes an ``error`` envelope, never a close."""

    def __init__(self, code: str, message: str, request_id: Any = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Since:
    """A recovery position: the last offset a client saw in a given epoch of a room."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    id: Any = None
    since: Since | None = None
    nick: str | None = None
    #: A room token (docs/PROTOCOL.md, "Room tokens"): grants this one room.
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Connect:
    """The first frame of a client that brought no token in the URL or a header."""

    token: str | None = None
    id: Any = None


@dataclass(frozen=True, slots=True)
class Refresh:
    """A new connection token for the same user, before or after refresh_required."""

    token: str
    id: Any = None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str
    id: Any = None


@dataclass(frozen=True, slots=True)
class Publish:
    room: str
    data: Any
    id: Any = None


@dataclass(frozen=True, slots=True)
class Typing:
    room: str
    id: Any = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: Any = None


@dataclass(frozen=True, slots=True)
class Presence:
    room: str
    id: Any = None


@dataclass(frozen=True, slots=True)
class History:
    room: str
    limit: int | None = None
    since: Since | None = None
    id: Any = None


Request = Join | Leave | Publish | Typing | Ping | Presence | History | Connect | Refresh

REQUEST_TYPES: Final = ("join", "leave", "publish", "typing", "ping", "presence", "history",
                        "connect", "refresh")


def valid_room(name: object) -> bool:
    """True for 1-64 characters of ``[A-Za-z0-9_.:-]``."""
    return isinstance(name, str) and ROOM_RE.fullmatch(name) is not None


def printable(text: str) -> bool:
    """True when ``text`` has no character of a ``NOT_PRINTABLE`` category (the rule for user
    ids, usernames and nicks; letters, marks, digits, punctuation, symbols, spaces are fine)."""
    if text.isascii():
        return text.isprintable()  # The common case, in C: ASCII minus the controls.
    return not any(unicodedata.category(ch) in NOT_PRINTABLE for ch in text)


def valid_id(value: object) -> bool:
    """True for a request ``id``: a string of at most 64 characters or an integer."""
    return (isinstance(value, str) and len(value) <= MAX_ID_LENGTH) or (
        isinstance(value, int) and not isinstance(value, bool))


def too_deep(value: Any, limit: int = MAX_DATA_DEPTH) -> bool:
    """True when ``value`` nests arrays and objects more than ``limit`` levels deep.

    Iterative, so that data nested up to orjson's parse limit (1024) cannot exhaust the stack.
    """
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > limit:
            return True
        for child in container.values() if isinstance(container, dict) else container:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def check_data(data: Any, request_id: Any = None, name: str = "data") -> Any:
    """``data`` when it can be published; ProtocolError(bad_request) when it nests too deep
    (``name``: the field as the client's dialect calls it)."""
    if too_deep(data):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"{name} must not nest arrays and objects more than {MAX_DATA_DEPTH} levels deep",
            request_id,
        )
    return data


def decode_json(frame: str | bytes) -> Any:
    """Parse a text frame as JSON; raise ProtocolError(bad_request) when it is not JSON."""
    try:
        return orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON") from None


def parse_request(frame: str | bytes) -> Request:
    """Parse one client text frame into a typed request.

    Raises ProtocolError with ``bad_request`` (not JSON, not an object, missing or invalid field)
    or ``unknown_type``; the error carries the request's ``id`` when one could be read.
    """
    if isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "binary frames are not accepted; send JSON in a text frame"
        )
    return parse_object(decode_json(frame))


def parse_object(obj: Any) -> Request:
    """Validate an already decoded JSON value as a request (see parse_request)."""
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a request must be a JSON object")
    request_id = obj.get("id")
    if request_id is not None and not valid_id(request_id):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "id must be a string (<= 64) or an integer")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "missing string field 'type'", request_id)
    if kind == "ping":
        return Ping(request_id)
    if kind not in REQUEST_TYPES:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown type {kind[:32]!r}", request_id
        )
    if kind == "connect":
        token = obj.get("token")
        return Connect(None if token is None else _token(token, request_id), request_id)
    if kind == "refresh":
        return Refresh(_token(obj.get("token"), request_id), request_id)
    room = obj.get("room")
    if not valid_room(room):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            "room must be 1-64 characters of letters, digits and _ . : -",
            request_id,
        )
    assert isinstance(room, str)
    if kind == "publish":
        if "data" not in obj:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "publish needs a 'data' field", request_id)
        return Publish(room, check_data(obj["data"], request_id), request_id)
    if kind == "join":
        nick = obj.get("nick")
        if nick is not None and (not isinstance(nick, str) or not nick.strip()):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "nick must be a non-empty string",
                                request_id)
        if nick is not None and not printable(nick.strip()):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"nick may have {PRINTABLE_RULE}",
                                request_id)
        token = obj.get("token")
        return Join(room, request_id, _parse_since(obj.get("since"), request_id),
                    nick.strip() if nick else None,
                    None if token is None else _token(token, request_id))
    if kind == "leave":
        return Leave(room, request_id)
    if kind == "typing":
        return Typing(room, request_id)
    if kind == "presence":
        return Presence(room, request_id)
    limit = obj.get("limit")
    if limit is not None and (
        not isinstance(limit, int) or isinstance(limit, bool)
        or not 1 <= limit <= MAX_HISTORY_LIMIT
    ):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"limit must be an integer from 1 to {MAX_HISTORY_LIMIT}",
            request_id,
        )
    return History(room, limit, _parse_since(obj.get("since"), request_id), request_id)


def _token(value: Any, request_id: Any) -> str:
    if isinstance(value, str) and 0 < len(value) <= MAX_TOKEN_LENGTH:
        return value
    raise ProtocolError(ErrorCode.BAD_REQUEST,
                        f"token must be a string of 1 to {MAX_TOKEN_LENGTH} characters",
                        request_id)


def _parse_since(value: Any, request_id: Any) -> Since | None:
    if value is None:
        return None
    if (
        isinstance(value, dict)
        and isinstance(value.get("offset"), int)
        and not isinstance(value.get("offset"), bool)
        and 0 <= value["offset"] <= MAX_OFFSET
        and isinstance(value.get("epoch"), str)
    ):
        return Since(value["offset"], value["epoch"])
    raise ProtocolError(
        ErrorCode.BAD_REQUEST,
        f"since must be {{\"offset\": integer from 0 to {MAX_OFFSET}, \"epoch\": string}}",
        request_id,
    )


# ---------------------------------------------------------------------------------------------
# Server -> client envelopes. Each returns the exact bytes sent in a text frame.


def _with_id(body: dict[str, Any], request_id: Any) -> bytes:
    if request_id is not None:
        body["id"] = request_id
    return orjson.dumps(body)


def welcome(conn_id: str, node_id: str, request_id: Any = None, **identity: Any) -> bytes:
    """The first envelope of a native connection, once its identity is known (``user_id``,
    ``username``, ``expires_at`` of its token when it has one; the connect frame's id)."""
    return _with_id({"type": "welcome", "conn_id": conn_id, "node_id": node_id, **identity},
                    request_id)


def refresh_required(grace_ms: int) -> bytes:
    """The connection's token expired: send ``refresh`` within ``grace_ms`` or be closed."""
    return orjson.dumps({"type": "refresh_required", "grace_ms": grace_ms})


def refreshed(expires_at: float, request_id: Any = None) -> bytes:
    return _with_id({"type": "refreshed", "expires_at": int(expires_at)}, request_id)


def pong(request_id: Any = None) -> bytes:
    return _with_id({"type": "pong"}, request_id)


def error(code: str, message: str, request_id: Any = None, **extra: Any) -> bytes:
    return _with_id({"type": "error", "code": code, "message": message, **extra}, request_id)


def error_from(exc: ProtocolError) -> bytes:
    return error(exc.code, exc.message, exc.request_id, **exc.extra)


def joined(room: str, request_id: Any = None, **extra: Any) -> bytes:
    return _with_id({"type": "joined", "room": room, **extra}, request_id)


def revoked(room: str, reason: str = "forbidden") -> bytes:
    """The connection was taken out of ``room``: after a refresh its rights no longer admit it
    (``forbidden``), or the server API unsubscribed its user (``unsubscribed``)."""
    return orjson.dumps({"type": "left", "room": room, "reason": reason})


def left(room: str, request_id: Any = None) -> bytes:
    return _with_id({"type": "left", "room": room}, request_id)


def published(room: str, offset: int, epoch: str, request_id: Any = None) -> bytes:
    """The publisher's acknowledgement: its message was accepted and got this offset."""
    return _with_id({"type": "published", "room": room, "offset": offset, "epoch": epoch},
                    request_id)


def presence_reply(room: str, members: list[dict[str, Any]], request_id: Any = None) -> bytes:
    users = {m["user_id"] for m in members}
    return _with_id(
        {"type": "presence", "room": room, "members": members, "count": len(users)}, request_id
    )


def history_reply(
    room: str, messages: list[bytes], offset: int, epoch: str, request_id: Any = None,
    recovered: bool | None = None, more: bool = False,
) -> bytes:
    """Stored message envelopes spliced in verbatim: no decode/re-encode of history.

    ``recovered`` (given when the request had ``since``) is False when the messages after
    ``since`` are no longer all kept; ``messages`` is then empty. ``more`` (sent only when
    true) says that the reply is one page (``history_page``): the client asks again with
    ``since`` set to the last message's offset.
    """
    body: dict[str, Any] = {"type": "history", "room": room, "offset": offset, "epoch": epoch}
    if recovered is not None:
        body["recovered"] = recovered
    if more:
        body["more"] = True
    head = _with_id(body, request_id)
    return head[:-1] + b',"messages":[' + b",".join(messages) + b"]}"


#: Bytes of a history reply besides its messages, counted against the page size: the head
#: (type, room, position, a 64-character id) with room to spare.
HISTORY_HEAD_BYTES: Final = 256


def history_page(messages: list[bytes], max_bytes: int) -> tuple[list[bytes], bool]:
    """The oldest of ``messages`` that fit in a history reply of ``max_bytes``, and whether
    some were left for the next page. A page holds at least one message, however large, so
    that paging always moves on."""
    budget = max_bytes - HISTORY_HEAD_BYTES
    used = 0
    for count, message in enumerate(messages):
        used += len(message) + 1  # The comma between messages.
        if used > budget and count > 0:
            return messages[:count], True
    return messages, False


def sender(user_id: str, username: str) -> dict[str, str]:
    return {"user_id": user_id, "username": username}


def message_prefix(room: str, data: Any, from_: dict[str, str], ts: int) -> bytes:
    """A ``message`` envelope without its closing brace; finish_message adds offset and epoch.

    Split so that the Redis Lua script can append the offset it assigns without parsing JSON:
    the bytes built here, plus the suffix, are the exact bytes every member receives.
    """
    body = orjson.dumps({"type": "message", "room": room, "data": data, "from": from_, "ts": ts})
    return body[:-1]


def finish_message(prefix: bytes, offset: int, epoch: str) -> bytes:
    """Close a message_prefix with its offset and epoch (same bytes as lua/publish.lua builds)."""
    return prefix + b',"offset":%d,"epoch":"%s"}' % (offset, epoch.encode())


def event(kind: str, room: str, **fields: Any) -> bytes:
    """An ephemeral room event (typing, user_joined, user_left): not stored, no offset."""
    return orjson.dumps({"type": kind, "room": room, **fields})


def presence_diff(room: str, joins: list[dict[str, Any]], leaves: list[dict[str, Any]]) -> bytes:
    """The users who joined and who left a large room in the last interval (service/diffs.py);
    each entry has the fields of its user_joined/user_left but ``type`` and ``room``."""
    return orjson.dumps({"type": "presence_diff", "room": room, "joins": joins,
                         "leaves": leaves})


def gap(room: str, offset: int, epoch: str) -> bytes:
    """Messages of the room before ``offset + 1`` (in ``epoch``) may never reach this member:
    the node lost them and history no longer has them. What follows continues from there."""
    return orjson.dumps({"type": "gap", "room": room, "recovered": False, "offset": offset,
                         "epoch": epoch})


def reconnect(retry_after_ms: int, rooms: dict[str, dict[str, Any]]) -> bytes:
    """The drain hint sent just before a 1012 close."""
    return orjson.dumps({"type": "reconnect", "retry_after_ms": retry_after_ms, "rooms": rooms})
