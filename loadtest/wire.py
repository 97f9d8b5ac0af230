"""The load generator's sans-I/O core: a lean RFC 6455 client codec and the bench message format.

No asyncio and no sockets here; loadgen.py drives these functions from an asyncio Protocol.

Why not the websockets client: a load generator must spend less CPU per received message than the
server spends per sent one, or the benchmark measures the generator. websockets' client parses each
frame through a generator, validates UTF-8 and queues it for ``recv()``; this codec splits a
buffer into (header byte, payload) pairs with a few slices, and the subscriber reads the two
integers it needs with ``bytes.find``. Only what the bench needs is implemented: no extensions
(compression is never offered, so RSV bits must be clear), client frames masked (RFC 6455
section 5.3), server frames unmasked (section 5.1).
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Final

import orjson

GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

#: The largest frame a bench client accepts (server frames are ~200 bytes in the bench).
MAX_FRAME: Final = 1 << 20


class WireError(Exception):
    """The server broke the protocol (bad handshake, masked or oversized frame, RSV bits)."""


# --- opening handshake (RFC 6455 section 4.1) ---------------------------------------------------


def new_key() -> bytes:
    """A fresh Sec-WebSocket-Key: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer ``key`` with (section 4.2.2, step 5.4)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def handshake_request(host: str, port: int, path: str, key: bytes) -> bytes:
    """The HTTP/1.1 upgrade request, without Sec-WebSocket-Extensions: no compression."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\nUser-Agent: roomcast-bench\r\n\r\n"
    ).encode()


def check_handshake_response(head: bytes, key: bytes) -> None:
    """Validate the response head (up to, not including, the blank line); raise WireError."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"101":
        raise WireError(f"handshake refused: {lines[0].decode(errors='replace')[:80]}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"sec-websocket-accept") != accept_for(key):
        raise WireError("handshake: wrong Sec-WebSocket-Accept")
    if headers.get(b"sec-websocket-extensions"):
        raise WireError("handshake: the server enabled an extension that was not offered")


# --- framing (RFC 6455 section 5.2) -------------------------------------------------------------


def mask_payload(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``mask`` (section 5.3), in one big-int step."""
    n = len(payload)
    if n == 0:
        return b""
    stream = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final client frame, masked with ``mask`` (random when not given)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + mask_payload(payload, mask)


def split_frames(buf: bytes | bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Complete server frames at the start of ``buf`` and how many bytes they used.

    Each frame is ``(first header byte, payload)``: the caller reads FIN (0x80) and the opcode
    (0x0F) from the first byte. An incomplete frame at the end is left for the next call.
    """
    frames: list[tuple[int, bytes]] = []
    pos = 0
    n = len(buf)
    while n - pos >= 2:
        b0 = buf[pos]
        b1 = buf[pos + 1]
        if b1 & 0x80:
            raise WireError("the server masked a frame")
        if b0 & 0x70:
            raise WireError("RSV bits set without a negotiated extension")
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if n - pos < 4:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            head = 4
        elif length == 127:
            if n - pos < 10:
                break
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        if length > MAX_FRAME:
            raise WireError(f"frame of {length} bytes is larger than {MAX_FRAME}")
        end = pos + head + length
        if end > n:
            break
        frames.append((b0, bytes(buf[pos + head : end])))
        pos = end
    return frames, pos


def close_code(payload: bytes) -> int:
    """The status code of a close frame's payload; 1005 when it carries none (section 7.1.5)."""
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005


# --- the bench message --------------------------------------------------------------------------


def publish_frame(
    room: str, seq: int, sent_ns: int, size: int = 100, request_id: int | None = None
) -> bytes:
    """A native ``publish`` request of about ``size`` bytes carrying ``seq`` and ``sent_ns``.

    ``data`` keeps its keys in this order (seq, sent_ns, pad) so that read_stamp can find them
    in any envelope that embeds ``data`` verbatim: roomcast's ``message``, the reference
    server's echo of this very frame, socket.io's ``message`` event. With ``request_id`` the
    request asks roomcast for a ``published`` acknowledgement carrying that id.
    """
    rid = b'"id":%d,' % request_id if request_id is not None else b""
    head = b'{"type":"publish",%s"room":"%s","data":{"seq":%d,"sent_ns":%d,"pad":"' % (
        rid, room.encode(), seq, sent_ns,
    )
    return head + b"x" * max(0, size - len(head) - 3) + b'"}}'


def read_ack(payload: bytes) -> tuple[int, bool] | None:
    """``(request id, ok)`` of roomcast's answer to a publish with an id, or None otherwise.

    ``published`` is ok; an ``error`` carrying an integer id is the refusal of that request.
    """
    if payload.startswith(b'{"type":"published"'):
        ok = True
    elif payload.startswith(b'{"type":"error"'):
        ok = False
    else:
        return None
    try:
        rid = orjson.loads(payload).get("id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return (rid, ok) if isinstance(rid, int) and not isinstance(rid, bool) else None


def read_stamp(payload: bytes) -> tuple[int, int] | None:
    """``(seq, sent_ns)`` of a bench message, or None for any other envelope."""
    i = payload.find(b'"seq":')
    if i < 0:
        return None
    try:
        j = payload.index(b",", i)
        k = payload.index(b'"sent_ns":', j)
        end = payload.index(b",", k)
        return int(payload[i + 6 : j]), int(payload[k + 10 : end])
    except ValueError:
        return _read_stamp_slow(payload)


def _read_stamp_slow(payload: bytes) -> tuple[int, int] | None:
    """The same, through a JSON parser, for a server that reformatted ``data``."""
    try:
        data = orjson.loads(payload).get("data")
        return int(data["seq"]), int(data["sent_ns"])
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None
