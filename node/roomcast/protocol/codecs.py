"""The three WebSocket dialects as codec tables over one request vocabulary (sans-I/O).

Each codec turns a client frame into one of the native ``Request`` types (envelopes.py) and a
service outcome into the bytes its clients expect, or None where the dialect shows nothing. The
WebSocket transport runs one loop for all three; only a dialect's opening (welcome, auto-join,
nick handshake) differs, and lives beside the loop.

* ``NativeCodec``: roomcast's own protocol (docs/PROTOCOL.md).
* ``FastApiCodec``: the FastAPI chat tutorial, bound to the room in its URL.
* ``TutorialCodec``: the python-websockets tutorial chat, bound to ``--tutorial-room``.
"""

from __future__ import annotations

from typing import Any, Protocol

from roomcast.protocol import dialects, envelopes
from roomcast.protocol.envelopes import ErrorCode, ProtocolError, Request

UNAVAILABLE_TEXT = "the cluster backend is unavailable; nothing was done, retry later"
RATE_LIMITED_TEXT = "too many messages; slow down"


class Codec(Protocol):
    #: The fan-out encoding of this dialect's members (rooms.py groups members by it).
    name: str

    def decode(self, frame: str | bytes) -> Request:
        """The request a frame asks for; raises ProtocolError for one that cannot be served."""

    def error(self, code: str, message: str, request_id: Any = None, **extra: Any) -> bytes:
        """An error as the dialect shows it."""

    def joined(self, room: str, request_id: Any, **position: Any) -> bytes | None: ...
    def left(self, room: str, request_id: Any) -> bytes | None: ...
    def published(self, room: str, offset: int, epoch: str, request_id: Any) -> bytes | None: ...
    def pong(self, request_id: Any) -> bytes | None: ...
    def refresh_required(self, grace_ms: int) -> bytes: ...

    def presence(
        self, room: str, members: list[dict[str, Any]], request_id: Any
    ) -> bytes | None: ...

    def history(
        self, room: str, messages: list[bytes], offset: int, epoch: str, request_id: Any,
        recovered: bool | None, more: bool = False,
    ) -> bytes | None: ...


class NativeCodec:
    name = dialects.NATIVE

    def decode(self, frame: str | bytes) -> Request:
        return envelopes.parse_request(frame)

    def error(self, code: str, message: str, request_id: Any = None, **extra: Any) -> bytes:
        return envelopes.error(code, message, request_id, **extra)

    def joined(self, room: str, request_id: Any, **position: Any) -> bytes:
        return envelopes.joined(room, request_id, **position)

    def left(self, room: str, request_id: Any) -> bytes:
        return envelopes.left(room, request_id)

    def published(self, room: str, offset: int, epoch: str, request_id: Any) -> bytes | None:
        # Only a publish with an id is acknowledged: fire-and-forget publishers get no reply.
        return None if request_id is None else envelopes.published(room, offset, epoch,
                                                                    request_id)

    def pong(self, request_id: Any) -> bytes:
        return envelopes.pong(request_id)

    def refresh_required(self, grace_ms: int) -> bytes:
        return envelopes.refresh_required(grace_ms)

    def presence(self, room: str, members: list[dict[str, Any]], request_id: Any) -> bytes:
        return envelopes.presence_reply(room, members, request_id)

    def history(
        self, room: str, messages: list[bytes], offset: int, epoch: str, request_id: Any,
        recovered: bool | None, more: bool = False,
    ) -> bytes:
        return envelopes.history_reply(room, messages, offset, epoch, request_id, recovered,
                                       more)


class _ChatCodec:
    """What the two chat tutorials share: one room, publish-only, no acknowledgements."""

    name = ""
    #: The dialect's text for a publish the backend could not take.
    unavailable_text = ""

    def __init__(self, room: str) -> None:
        self.room = room

    def notice(self, text: str) -> bytes:
        """A free-text error, in the dialect's shape."""
        raise NotImplementedError

    def error(self, code: str, message: str, request_id: Any = None, **extra: Any) -> bytes:
        if code == ErrorCode.UNAVAILABLE:
            message = self.unavailable_text
        elif code == ErrorCode.RATE_LIMITED:
            message = f"rate limited; retry after {extra.get('retry_after_ms')} ms"
        return self.notice(message)

    def joined(self, room: str, request_id: Any, **position: Any) -> None:
        return None

    def left(self, room: str, request_id: Any) -> None:
        return None

    def published(self, room: str, offset: int, epoch: str, request_id: Any) -> None:
        return None

    def pong(self, request_id: Any) -> bytes | None:
        return None

    def refresh_required(self, grace_ms: int) -> bytes:
        """The chat dialects cannot refresh: they are told to reconnect with a new token."""
        return self.notice(f"your token expired; reconnect with a new one within "
                           f"{grace_ms // 1000} s")

    def presence(self, room: str, members: list[dict[str, Any]], request_id: Any) -> None:
        return None

    def history(
        self, room: str, messages: list[bytes], offset: int, epoch: str, request_id: Any,
        recovered: bool | None, more: bool = False,
    ) -> None:
        return None


class FastApiCodec(_ChatCodec):
    """``/ws/chat/{room}``: frames are messages (JSON or plain text), typing and ping."""

    name = dialects.FASTAPI
    unavailable_text = "unavailable: the cluster backend is down; message not sent"

    def decode(self, frame: str | bytes) -> Request:
        if isinstance(frame, bytes):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frames are not accepted; send text")
        match dialects.parse_fastapi(frame):
            case dialects.Say(content):
                return envelopes.Publish(self.room,
                                         envelopes.check_data(content, name="content"))
            case dialects.Typing():
                return envelopes.Typing(self.room)
            case dialects.Ping():
                return envelopes.Ping()
            case dialects.Unknown(kind):
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}")
        raise AssertionError("parse_fastapi returned an unknown action")  # pragma: no cover

    def pong(self, request_id: Any) -> bytes:
        return b'{"type":"pong"}'

    def notice(self, text: str) -> bytes:
        """A free-text error, as the dialect's opening sends it."""
        return dialects.fastapi_error(text)


class TutorialCodec(_ChatCodec):
    """``/``: after the join handshake, every frame is ``{"type": "chat", "text": ...}``."""

    name = dialects.TUTORIAL
    unavailable_text = "unavailable: message not sent, retry later"

    def __init__(self, room: str, max_chat_length: int) -> None:
        super().__init__(room)
        self.max_chat_length = max_chat_length

    def decode(self, frame: str | bytes) -> Request:
        message = None if isinstance(frame, bytes) else dialects.parse_tutorial(frame)
        if message is None or message.get("type") != "chat":
            raise ProtocolError(ErrorCode.BAD_REQUEST, 'expected {"type": "chat", "text": "..."}')
        text = message.get("text")
        if not isinstance(text, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "text must be a string")
        return envelopes.Publish(self.room, text[: self.max_chat_length])

    def notice(self, text: str) -> bytes:
        """A free-text error, as the dialect's opening sends it."""
        return dialects.tutorial("error", "server", text)
