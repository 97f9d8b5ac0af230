"""The bench's socket.io dialect, sans-I/O: Engine.IO v4 over WebSocket and Socket.IO v5 packets.

No asyncio and no sockets here; loadgen.py drives these functions. Over the WebSocket transport
each text frame is one Engine.IO packet: a one-digit type and its data (Engine.IO protocol v4,
"Packet encoding"). The server opens with ``0{"sid":...,"pingInterval":...}``, pings with ``2``
(the client must answer ``3`` within pingTimeout or be dropped) and carries Socket.IO packets in
``4`` messages. A Socket.IO packet (Socket.IO protocol v5, "Packet encoding") is a type digit,
an optional ``<attachments>-`` (binary packets only), an optional ``/namespace,``, an optional
ack id and a JSON payload: ``40`` connects to the main namespace and is answered
``40{"sid":...}``; ``42["name",data]`` is an event, ``42<id>["name",data]`` one that asks for an
ack, answered ``43<id>[...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import orjson

#: The WebSocket-only Engine.IO endpoint (no HTTP long-polling first).
PATH: Final = "/socket.io/?EIO=4&transport=websocket"

# Engine.IO packet types (one ASCII digit).
EIO_OPEN: Final = 0x30
EIO_CLOSE: Final = 0x31
EIO_PING: Final = 0x32
EIO_PONG: Final = 0x33
EIO_MESSAGE: Final = 0x34
EIO_NOOP: Final = 0x36

# Socket.IO packet types, the digit after Engine.IO's ``4``.
SIO_TYPES: Final = {
    0x30: "connect", 0x31: "disconnect", 0x32: "event", 0x33: "ack",
    0x34: "connect_error", 0x35: "binary_event", 0x36: "binary_ack",
}

PING: Final = b"2"
PONG: Final = b"3"
#: CONNECT to the main namespace ``/`` without auth data.
CONNECT: Final = b"40"


class SioError(Exception):
    """A frame that is not a valid Engine.IO / Socket.IO packet."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One decoded frame.

    ``kind``: ``open``, ``close``, ``ping``, ``pong``, ``noop``, ``upgrade`` (Engine.IO) or one
    of SIO_TYPES' values (a Socket.IO packet). ``data`` is the JSON text that follows the
    header (``b""`` when none), ``namespace`` ``/`` unless the packet names another one.
    """

    kind: str
    data: bytes = b""
    ack_id: int | None = None
    namespace: str = "/"

    def json(self) -> object:
        """``data`` parsed; None when there is none."""
        if not self.data:
            return None
        try:
            return orjson.loads(self.data)
        except orjson.JSONDecodeError:
            raise SioError(f"{self.kind} packet with invalid JSON: {self.data[:60]!r}") from None


_EIO_KINDS: Final = {EIO_OPEN: "open", EIO_CLOSE: "close", EIO_PING: "ping", EIO_PONG: "pong",
                     0x35: "upgrade", EIO_NOOP: "noop"}


def parse(frame: bytes) -> Packet:
    """Decode one text frame from the server; SioError when it is not a packet."""
    if not frame:
        raise SioError("empty frame")
    eio = frame[0]
    if eio != EIO_MESSAGE:
        kind = _EIO_KINDS.get(eio)
        if kind is None:
            raise SioError(f"unknown Engine.IO packet type {chr(eio)!r}")
        return Packet(kind, bytes(frame[1:]))
    if len(frame) < 2:
        raise SioError("Engine.IO message without a Socket.IO packet")
    kind = SIO_TYPES.get(frame[1])
    if kind is None:
        raise SioError(f"unknown Socket.IO packet type {chr(frame[1])!r}")
    pos = 2
    n = len(frame)
    if kind.startswith("binary_"):
        dash = frame.find(b"-", pos)
        if dash < 0 or not frame[pos:dash].isdigit():
            raise SioError("binary packet without its attachment count")
        pos = dash + 1
    namespace = "/"
    if pos < n and frame[pos] == 0x2F:  # "/": a namespace up to the next comma.
        comma = frame.find(b",", pos)
        end = n if comma < 0 else comma
        namespace = frame[pos:end].decode(errors="replace")
        pos = end + 1 if comma >= 0 else n
    start = pos
    while pos < n and 0x30 <= frame[pos] <= 0x39:
        pos += 1
    ack_id = int(frame[start:pos]) if pos > start else None
    return Packet(kind, bytes(frame[pos:]), ack_id, namespace)


def event_frame(name: str, data: bytes, ack_id: int | None = None) -> bytes:
    """``42[<ack_id>]["name",data]``: an event on the main namespace; ``data`` is JSON text."""
    head = b'42%d["' % ack_id if ack_id is not None else b'42["'
    return head + name.encode() + b'",' + data + b"]"


def read_ack(frame: bytes) -> tuple[int, bool] | None:
    """``(ack id, ok)`` of an ack packet (``43<id>[...]``), or None for any other frame.

    ``ok`` is False when the server's answer carries ``"ok":false`` or an ``error``.
    """
    if not frame.startswith(b"43"):
        return None
    try:
        packet = parse(frame)
    except SioError:
        return None
    if packet.ack_id is None:
        return None
    body = packet.data
    return packet.ack_id, b'"ok":false' not in body and b'"error"' not in body
