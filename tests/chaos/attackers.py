"""Hostile clients for the chaos cases: raw-socket flooders and non-readers, a join burst, and
what the node's side says about them (its close codes, its memory).

``RawClient`` speaks just enough RFC 6455 to be served: the opening handshake (section 4.1),
then masked client frames (section 5.3). It never reads past the handshake, and its socket and
stream buffers are small, so a node that keeps writing to it cannot push the data anywhere: the
node has to bound it or cut the client.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.harness import NodeProcess

OP_TEXT = 0x1
OP_PING = 0x9


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame (RFC 6455 section 5.2; clients must mask, 5.3)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


def text(obj: Any) -> bytes:
    return client_frame(OP_TEXT, orjson.dumps(obj))


@dataclass(slots=True)
class FloodResult:
    """How a flood ended: ``reset`` (the node closed the TCP connection), ``stalled`` (the node
    stopped reading us for ``stall`` seconds), ``enough`` (stopped early) or ``done``."""

    frames: int
    ended: str
    seconds: float


class RawClient:
    """A WebSocket client on a bare socket that writes and never reads after the handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, path: str, timeout: float = 10.0) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Small buffers: what the node sends piles up on its side, not in our kernel.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
            await writer.drain()
            status = await reader.readline()
            if b" 101 " not in status:
                writer.transport.abort()
                raise OSError(f"handshake refused: {status!r}")
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
        return cls(reader, writer)

    async def send(self, data: bytes, timeout: float = 5.0) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), timeout)

    async def flood(
        self, frame: bytes, *, count: int, seconds: float, batch: int = 64, stall: float = 2.0,
        enough: Callable[[], bool] = lambda: False,
    ) -> FloodResult:
        """Write ``frame`` up to ``count`` times within ``seconds``, in batches; stop early
        (``ended="enough"``) once ``enough()`` is true (the verdict is already clear)."""
        start = time.monotonic()
        sent = 0
        chunk = frame * batch
        try:
            while sent < count and time.monotonic() - start < seconds:
                if enough():
                    return FloodResult(sent, "enough", time.monotonic() - start)
                n = min(batch, count - sent)
                self.writer.write(chunk if n == batch else frame * n)
                try:
                    await asyncio.wait_for(self.writer.drain(), stall)
                except TimeoutError:
                    return FloodResult(sent, "stalled", time.monotonic() - start)
                sent += n
                await asyncio.sleep(0)
        except (ConnectionError, OSError):
            return FloodResult(sent, "reset", time.monotonic() - start)
        return FloodResult(sent, "done", time.monotonic() - start)

    def abort(self) -> None:
        self.writer.transport.abort()


# --- what the node says --------------------------------------------------------------------


def node_closes(node: NodeProcess, user_prefix: str) -> dict[str, int | None]:
    """For every connection whose ``user_id`` starts with ``user_prefix``: the close code the
    node logged (absent: the node still has it open)."""
    conn_of: dict[str, str] = {}
    for line in node.logged("connection opened"):
        user = str(line.get("user_id", ""))
        if user.startswith(user_prefix):
            conn_of[str(line.get("conn_id"))] = user
    closes: dict[str, int | None] = {}
    for line in node.logged("connection closed"):
        user = conn_of.get(str(line.get("conn_id")))
        if user is not None:
            closes[user] = line.get("code")
    return closes


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for row in status:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) / 1024
    return 0.0


class RssWatch:
    """Samples a process's resident memory every ``interval`` s; ``peak`` is the highest."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = rss_mb(pid)
        self.peak = self.baseline
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            while True:
                self.peak = max(self.peak, rss_mb(self.pid))
                await asyncio.sleep(self.interval)

    @property
    def growth(self) -> float:
        return self.peak - self.baseline


# --- join burst ----------------------------------------------------------------------------


@dataclass(slots=True)
class Burst:
    """``n`` extra members that joined one room at once; they read (and count) what comes."""

    joined: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0
    frames: int = 0
    closes: collections.Counter[str] = field(default_factory=collections.Counter)
    sockets: list[ClientConnection] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)

        async def close_one(ws: ClientConnection) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)

        for first in range(0, len(self.sockets), 200):
            await asyncio.gather(*(close_one(ws) for ws in self.sockets[first:first + 200]))


async def join_burst(
    urls: Sequence[str], room: str, n: int, timeout: float = 30.0, prefix: str = "burst",
) -> Burst:
    """``n`` clients connect and join ``room`` all at once (gathered, no batching); each gets
    ``timeout`` seconds in all. Joined clients keep reading until ``Burst.close``."""
    burst = Burst()
    start = time.monotonic()

    async def drain(ws: ClientConnection) -> None:
        try:
            async for _ in ws:
                burst.frames += 1
        except Exception as exc:  # Task boundary of a throwaway client: only counted.
            burst.closes[type(exc).__name__] += 1
        else:
            burst.closes[str(ws.close_code)] += 1

    async def one(i: int) -> None:
        url = urls[i % len(urls)] + f"?user_id={prefix}-{i}"
        try:
            async with asyncio.timeout(timeout):
                ws = await connect(url, compression=None, max_size=None, open_timeout=timeout,
                                   ping_interval=None, close_timeout=2)
                burst.sockets.append(ws)
                welcome = orjson.loads(await ws.recv())
                assert welcome.get("type") == "welcome", welcome
                await ws.send(orjson.dumps({"type": "join", "room": room, "id": 1}).decode())
                while True:
                    reply = orjson.loads(await ws.recv())
                    if reply.get("id") == 1:
                        break
        except Exception as exc:  # Counted by kind: the assertion is on the totals.
            burst.failed[type(exc).__name__] += 1
            return
        if reply.get("type") == "joined":
            burst.joined += 1
        else:
            burst.failed[str(reply.get("code"))] += 1
        burst.readers.append(asyncio.create_task(drain(ws)))

    await asyncio.gather(*(one(i) for i in range(n)))
    burst.seconds = time.monotonic() - start
    return burst
