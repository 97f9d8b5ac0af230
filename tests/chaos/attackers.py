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
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

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
    async def open(
        cls, port: int, path: str, timeout: float = 10.0, *, reading: bool = False,
    ) -> RawClient:
        """Connect and complete the opening handshake. Unless ``reading``, the socket's
        receive buffer is 4 KB and the stream's 1 KB: what the node sends piles up on its
        side, not in ours."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if not reading:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
            except BaseException:
                sock.close()
                raise
            reader, writer = await asyncio.open_connection(
                sock=sock, limit=2 ** 16 if reading else 1024)
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

    async def frame(self) -> tuple[int, bytes]:
        """Read one server frame (unmasked, RFC 6455 section 5.2): (opcode, payload)."""
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(length)

    async def drain(self) -> int:
        """Read and discard until the node closes; return the bytes read (cheap: no parsing,
        so a thousand members cost this process little)."""
        total = 0
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await self.reader.read(2 ** 16):
                total += len(chunk)
        return total

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


def raise_fd_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (node processes inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@dataclass(slots=True)
class Burst:
    """``n`` extra members that joined one room at once; they keep reading (raw) until closed.

    ``seconds`` runs from the moment every join was sent to the last reply.
    """

    joined: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    connect_seconds: float = 0.0
    seconds: float = 0.0
    members: list[RawClient] = field(default_factory=list)
    readers: list[asyncio.Task[int]] = field(default_factory=list)

    async def close(self) -> None:
        for member in self.members:
            member.abort()
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


async def join_burst(
    port: int, room: str, n: int, timeout: float = 30.0, prefix: str = "burst",
    connecting: int = 100,
) -> Burst:
    """``n`` clients connect (``connecting`` handshakes in flight at most: the listen backlog
    is not what this measures), then all send their ``join`` at once; each reply must come
    within ``timeout`` seconds of the burst. Joined members keep reading until Burst.close."""
    raise_fd_limit(2 * n + 512)
    burst = Burst()
    gate = asyncio.Semaphore(connecting)
    start = time.monotonic()

    async def open_one(i: int) -> RawClient | None:
        async with gate:
            try:
                member = await RawClient.open(port, f"/ws?user_id={prefix}-{i}", timeout,
                                              reading=True)
            except (OSError, TimeoutError) as exc:
                burst.failed[f"connect {type(exc).__name__}"] += 1
                return None
        burst.members.append(member)
        return member

    opened = [m for m in await asyncio.gather(*(open_one(i) for i in range(n))) if m]
    burst.connect_seconds = time.monotonic() - start
    join = text({"type": "join", "room": room, "id": "burst"})
    for member in opened:
        member.writer.write(join)
    start = time.monotonic()

    async def reply_of(member: RawClient) -> None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    opcode, payload = await member.frame()
                    if opcode == OP_TEXT and b'"id":"burst"' in payload:
                        break
                    if opcode == 0x8:
                        raise ConnectionError(f"closed: {payload[:2].hex()}")
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            burst.failed[type(exc).__name__] += 1
            return
        reply = orjson.loads(payload)
        if reply.get("type") == "joined":
            burst.joined += 1
        else:
            burst.failed[str(reply.get("code"))] += 1
        burst.readers.append(asyncio.create_task(member.drain()))

    await asyncio.gather(*(reply_of(m) for m in opened))
    burst.seconds = time.monotonic() - start
    return burst
