"""The load generator: lean WebSocket clients on uvloop, run in worker processes.

A worker process owns a share of the subscribers. The coordinator (bench.py) drives it through a
pipe with small command dicts (``WorkerHandle.call``); the worker answers each with one dict.
Subscribers record, per message, the receive time minus the publisher's ``sent_ns`` (latency) and
count every sequence number they see (loss and duplicates are computed from the counts at the end;
a first arrival below the highest number seen so far counts as out of order).

Three dialects: ``native`` (roomcast: wait for ``welcome``, send ``join``, wait for ``joined``),
``reference`` (the bare server: ready once the WebSocket is open, every client gets every message)
and ``socketio`` (Engine.IO v4 + Socket.IO v5, loadtest/sio.py: the room is named in the
handshake query, ready once the CONNECT is answered, Engine.IO pings answered).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, cast
from urllib.parse import urlsplit

from loadtest import sio, wire

HANDSHAKE_LIMIT = 16384  # Bytes of response head before the handshake counts as broken.
CLOSE_TIMEOUT = 2.0

NATIVE = "native"
REFERENCE = "reference"
SOCKETIO = "socketio"
DIALECTS = (NATIVE, REFERENCE, SOCKETIO)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a client connects: host, port and the HTTP path (with its query)."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """``ws://host:port/path?query``; wss is not supported by the bench's lean client."""
        parts = urlsplit(url)
        if parts.scheme != "ws" or not parts.hostname:
            raise ValueError(f"{url!r}: the bench client speaks ws://host:port/path only")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, parts.port or 80, path)

    def with_query(self, **params: str) -> Endpoint:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        sep = "&" if "?" in self.path else "?"
        return Endpoint(self.host, self.port, f"{self.path}{sep}{query}")


class WSClient(asyncio.Protocol):
    """One client connection: handshake, frame split, ping answers, close. No extensions.

    ``opened`` resolves after the 101 response; ``closed`` resolves with the close code (1006
    when the TCP connection ended without a close frame). Subclasses override on_message, which
    gets each complete text or binary message and the time.time_ns() of its arrival.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        self.endpoint = endpoint
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self._key = wire.new_key()
        self._head: bytearray | None = bytearray()  # Handshake response so far; None once open.
        self._buf = bytearray()
        self._fragments: list[bytes] | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ep = self.endpoint
        self.transport.write(wire.handshake_request(ep.host, ep.port, ep.path, self._key))

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > HANDSHAKE_LIMIT:
                    self._fail(wire.WireError("handshake response too long"))
                return
            try:
                wire.check_handshake_response(bytes(self._head[:end]), self._key)
            except wire.WireError as exc:
                self._fail(exc)
                return
            data = bytes(self._head[end + 4 :])
            self._head = None
            if not self.opened.done():
                self.opened.set_result(None)
            self.on_open()
            if not data:
                return
        now = time.time_ns()
        src: bytes | bytearray
        if self._buf:
            self._buf += data
            src = self._buf
        else:
            src = data
        try:
            frames, used = wire.split_frames(src)
        except wire.WireError as exc:
            self._fail(exc)
            return
        if src is self._buf:
            del self._buf[:used]
        elif used < len(data):
            self._buf += data[used:]
        for b0, payload in frames:
            opcode = b0 & 0x0F
            if opcode == wire.OP_TEXT or opcode == wire.OP_BINARY:
                if b0 & 0x80:
                    self.on_message(payload, now)
                else:
                    self._fragments = [payload]
            elif opcode == wire.OP_CONT and self._fragments is not None:
                self._fragments.append(payload)
                if b0 & 0x80:
                    whole, self._fragments = b"".join(self._fragments), None
                    self.on_message(whole, now)
            elif opcode == wire.OP_PING:
                self._write(wire.OP_PONG, payload)
            elif opcode == wire.OP_CLOSE:
                self._closing(wire.close_code(payload))
                self._write(wire.OP_CLOSE, payload[:2])
                if self.transport is not None:
                    self.transport.close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing(1006)
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(self.close_code or 1006)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- for subclasses and callers --------------------------------------------------------------

    def on_open(self) -> None:
        """Called once, right after the handshake succeeded."""

    def on_message(self, payload: bytes, now_ns: int) -> None:
        """Called for every complete data message."""

    def send_text(self, payload: bytes) -> None:
        self._write(wire.OP_TEXT, payload)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        await self._writable.wait()

    async def close(self, code: int = 1000) -> None:
        """Start the closing handshake and wait (bounded) for the server to finish it."""
        if self.transport is None or self.closed.done():
            return
        if self.close_code is None and self._head is None:
            self._write(wire.OP_CLOSE, code.to_bytes(2, "big"))
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT)
        except TimeoutError:
            self.transport.abort()

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.encode_frame(opcode, payload))

    def _closing(self, code: int) -> None:
        if self.close_code is None:
            self.close_code = code

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


@dataclass(slots=True)
class Tally:
    """What one worker's subscribers received since the last reset."""

    messages: int = 0  # Bench messages, duplicates included.
    other: int = 0  # Any other envelope (welcome, joined, user_joined...).
    first_ns: int = 0
    last_ns: int = 0
    latencies_us: array.array[int] = field(default_factory=lambda: array.array("q"))

    def reset(self) -> None:
        self.messages = self.other = self.first_ns = self.last_ns = 0
        self.latencies_us = array.array("q")


class Subscriber(WSClient):
    """A bench client: ``ready`` resolves once it can receive (joined, or just open).

    ``dialect`` native: roomcast's protocol (wait for welcome, join ``room`` when given);
    reference: ready as soon as the handshake is done; socketio: the endpoint's query already
    names the room (subscriber_endpoint), ready once socket.io answered the CONNECT.
    """

    def __init__(
        self, endpoint: Endpoint, tally: Tally, messages: int, room: str | None, dialect: str
    ) -> None:
        super().__init__(endpoint)
        self.tally = tally
        self.room = room
        self.dialect = dialect
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.counts = bytearray(messages)  # Times each sequence number arrived (capped at 255).
        self.received = 0
        self.top = -1  # The highest sequence number received so far.
        self.out_of_order = 0  # First arrivals of a number below ``top``.

    def on_open(self) -> None:
        if self.dialect == REFERENCE:
            self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed {self.close_code} before ready"))

    def on_message(self, payload: bytes, now_ns: int) -> None:
        stamp = wire.read_stamp(payload)
        tally = self.tally
        if stamp is None:
            if payload == sio.PING and self.dialect == SOCKETIO:
                self.send_text(sio.PONG)  # Engine.IO heartbeat: not an envelope, not counted.
                return
            tally.other += 1
            if not self.ready.done():
                self._handshake_step(payload)
            return
        seq, sent_ns = stamp
        tally.latencies_us.append((now_ns - sent_ns) // 1000)
        tally.messages += 1
        if not tally.first_ns:
            tally.first_ns = now_ns
        tally.last_ns = now_ns
        self.received += 1
        counts = self.counts
        if 0 <= seq < len(counts):
            seen = counts[seq]
            if seen < 255:
                counts[seq] = seen + 1
            if seq > self.top:
                self.top = seq
            elif not seen:
                self.out_of_order += 1

    def _handshake_step(self, payload: bytes) -> None:
        if self.dialect == SOCKETIO:
            self._socketio_step(payload)
        elif b'"type":"welcome"' in payload:
            if self.room is None:
                self.ready.set_result(None)
            else:
                self.send_text(b'{"type":"join","room":"%s","id":1}' % self.room.encode())
        elif b'"type":"joined"' in payload:
            self.ready.set_result(None)
        elif b'"type":"error"' in payload:
            self.ready.set_exception(RuntimeError(payload[:200].decode(errors="replace")))

    def _socketio_step(self, payload: bytes) -> None:
        try:
            packet = sio.parse(payload)
        except sio.SioError as exc:
            self.ready.set_exception(exc)
            return
        if packet.kind == "open":
            self.send_text(sio.CONNECT)
        elif packet.kind == "connect":
            self.ready.set_result(None)
        elif packet.kind in ("connect_error", "disconnect", "close"):
            detail = payload[:200].decode(errors="replace")
            self.ready.set_exception(RuntimeError(f"socket.io refused: {detail}"))


class AckedPublisher(Subscriber):
    """The --acked publisher: each publish asks for an acknowledgement, whose id is the message's
    sequence number (roomcast's ``published``, socket.io's ack callback).

    ``status[seq]`` is 0 while pending, 1 once acknowledged, 2 once refused (roomcast's
    ``error`` with that id). An acknowledgement whose id is below one already received counts as
    out of order. ``answered`` is set on every acknowledgement or refusal, for the sender's window.
    """

    def __init__(self, endpoint: Endpoint, dialect: str, messages: int) -> None:
        if dialect == REFERENCE:
            raise ValueError("the reference server does not acknowledge publishes")
        super().__init__(endpoint, Tally(), 0, None, dialect)
        self.status = bytearray(messages)
        self.sent_ns = array.array("q", bytes(8 * messages))
        self.ack_latencies_us: array.array[int] = array.array("q")
        self.inflight = 0
        self.acked = self.refused = self.out_of_order = self.duplicate_acks = self.stray = 0
        self.top_ack = -1
        self.first_ack_ns = self.last_ack_ns = 0
        self.answered = asyncio.Event()

    def send_publish(self, room: str, seq: int, size: int) -> None:
        now = time.time_ns()
        body = wire.publish_frame(room, seq, now, size,
                                  request_id=seq if self.dialect == NATIVE else None)
        if self.dialect == SOCKETIO:
            body = sio.event_frame("publish", body, seq)
        self.sent_ns[seq] = now
        self.inflight += 1
        self.send_text(body)

    def on_message(self, payload: bytes, now_ns: int) -> None:
        ack = sio.read_ack(payload) if self.dialect == SOCKETIO else wire.read_ack(payload)
        if ack is None:
            super().on_message(payload, now_ns)
            return
        rid, ok = ack
        status = self.status
        if not 0 <= rid < len(status):
            self.stray += 1
            return
        if status[rid]:
            self.duplicate_acks += 1
            return
        status[rid] = 1 if ok else 2
        self.inflight -= 1
        if rid < self.top_ack:
            self.out_of_order += 1
        else:
            self.top_ack = rid
        if ok:
            self.acked += 1
            self.ack_latencies_us.append((now_ns - self.sent_ns[rid]) // 1000)
            self.first_ack_ns = self.first_ack_ns or now_ns
            self.last_ack_ns = now_ns
        else:
            self.refused += 1
        self.answered.set()

    def unacked(self) -> list[int]:
        """Sequence numbers not acknowledged (refused, or never answered)."""
        return [seq for seq, state in enumerate(self.status) if state != 1]


async def open_client(client: WSClient, timeout: float) -> None:
    """Connect ``client`` and wait for its handshake (and ``ready``, for a Subscriber)."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        ep = client.endpoint
        await loop.create_connection(lambda: client, ep.host, ep.port)
        await client.opened
        if isinstance(client, Subscriber):
            await client.ready

    try:
        await asyncio.wait_for(go(), timeout)
    except BaseException:
        if client.transport is not None:
            client.transport.abort()
        for future in (client.opened, getattr(client, "ready", None)):
            if future is not None and future.done() and not future.cancelled():
                future.exception()  # Retrieved: no "never retrieved" warning at exit.
        raise


def room_name(index: int) -> str:
    return f"bench-{index}"


def subscriber_endpoint(
    endpoint: Endpoint, dialect: str, user_id: str, room: str | None
) -> Endpoint:
    """Where one client connects: roomcast takes its ``user_id`` in the query (it joins its room
    with a message afterwards); socket.io takes the ``room`` in the query."""
    if dialect == NATIVE:
        return endpoint.with_query(user_id=user_id)
    if dialect == SOCKETIO and room is not None:
        return endpoint.with_query(room=room)
    return endpoint


def expected_seqs(messages: int, rooms: int, room_index: int, dialect: str) -> range:
    """Sequence numbers a subscriber should receive: message ``seq`` goes to room seq % rooms.

    The reference server has no rooms: each of its clients receives every message.
    """
    return range(messages) if dialect == REFERENCE else range(room_index, messages, rooms)


# --- worker process ------------------------------------------------------------------------------


class Worker:
    """One load-generator process: its subscribers, its tally, its command loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.tally = Tally()
        self.subs: list[tuple[Subscriber, range]] = []
        self.closes: Counter[int] = Counter()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def readable() -> None:
            try:
                commands.put_nowait(self.conn.recv())
            except (EOFError, OSError):  # The coordinator is gone: stop.
                loop.remove_reader(self.conn.fileno())
                commands.put_nowait(None)

        loop.add_reader(self.conn.fileno(), readable)
        # add_reader made the pipe non-blocking; a large reply (the latency samples) must be
        # written whole, and the coordinator reads it at once, so block on it.
        os.set_blocking(self.conn.fileno(), True)
        while True:
            command = await commands.get()
            if command is None:
                await self.close_all()
                return
            op = command["op"]
            try:
                reply = await getattr(self, f"op_{op}")(command)
            except Exception as exc:  # Task boundary: report to the coordinator, keep serving.
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self.conn.send(reply)
            if op == "exit":
                return

    async def op_connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open ``count`` subscribers, global indexes ``first``..; bounded by ``timeout``."""
        endpoints = [Endpoint.parse(url) for url in cmd["urls"]]
        dialect: str = cmd["dialect"]
        rooms: int = cmd["rooms"]
        messages: int = cmd["messages"]
        limit = asyncio.Semaphore(cmd["concurrency"])
        deadline = time.monotonic() + cmd["timeout"]
        errors: Counter[str] = Counter()
        opened: list[tuple[Subscriber, range]] = []

        async def one(index: int) -> None:
            endpoint = endpoints[index % len(endpoints)]
            room_index = index % rooms
            room = room_name(room_index) if cmd["join"] else None
            endpoint = subscriber_endpoint(endpoint, dialect, f"{cmd['run_id']}-{index}", room)
            sub = Subscriber(endpoint, self.tally, messages, room, dialect)
            async with limit:
                left = deadline - time.monotonic()
                try:
                    await open_client(sub, max(0.01, left))
                except Exception as exc:
                    errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                    return
            want = expected_seqs(messages, rooms, room_index, dialect) if cmd["join"] else range(0)
            opened.append((sub, want))

        first: int = cmd["first"]
        await asyncio.gather(*(one(i) for i in range(first, first + cmd["count"])))
        self.subs.extend(opened)
        return {
            "ok": len(opened),
            "failed": sum(errors.values()),
            "errors": dict(errors.most_common(3)),
            "expected": sum(len(want) for _, want in opened),
        }

    async def op_counts(self, cmd: dict[str, Any]) -> dict[str, Any]:
        t = self.tally
        return {
            "messages": t.messages, "other": t.other, "first_ns": t.first_ns,
            "last_ns": t.last_ns,
            "closed": sum(1 for sub, _ in self.subs if sub.closed.done()),
        }

    async def op_reset(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.tally.reset()
        for sub, _ in self.subs:
            sub.received = sub.out_of_order = 0
            sub.top = -1
            sub.counts[:] = bytes(len(sub.counts))
        return {}

    async def op_results(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Loss, duplicates and order per subscriber (by sequence number), every latency sample.

        ``unacked`` (optional): sequence numbers the server did not acknowledge; they are not
        expected, and receiving one is not counted as a delivery (nor as misrouted).
        """
        unacked = set(cmd.get("unacked") or ())
        lost = duplicated = misrouted = delivered = expected = lossy = out_of_order = 0
        closes: Counter[int] = Counter()
        for sub, want in self.subs:
            counts = sub.counts
            mine = counts[want.start : want.stop : want.step] if len(want) else b""
            distinct_all = len(counts) - counts.count(0)
            distinct = len(mine) - mine.count(0)
            wanted = len(want)
            if unacked:
                skip = [seq for seq in unacked if seq in want]
                got_skipped = sum(1 for seq in skip if counts[seq])
                wanted -= len(skip)
                distinct -= got_skipped
                distinct_all -= got_skipped
            expected += wanted
            delivered += distinct
            lost += wanted - distinct
            lossy += distinct < wanted
            misrouted += distinct_all - distinct
            duplicated += sub.received - (len(counts) - counts.count(0))
            out_of_order += sub.out_of_order
            if sub.close_code is not None:
                closes[sub.close_code] += 1
        t = self.tally
        return {
            "expected": expected, "delivered": delivered, "lost": lost,
            "duplicated": duplicated, "misrouted": misrouted, "lossy_subscribers": lossy,
            "out_of_order": out_of_order,
            "closes": {str(code): n for code, n in closes.items()},
            "first_ns": t.first_ns, "last_ns": t.last_ns,
            "latencies_us": t.latencies_us.tobytes(),
        }

    async def op_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        n = await self.close_all()
        return {"closed": n}

    async def op_exit(self, cmd: dict[str, Any]) -> dict[str, Any]:
        await self.close_all()
        return {}

    async def close_all(self) -> int:
        subs = [sub for sub, _ in self.subs]
        self.subs = []
        await asyncio.gather(*(sub.close() for sub in subs), return_exceptions=True)
        self.tally.reset()
        return len(subs)


def worker_main(conn: Connection) -> None:
    """Entry point of a worker process (multiprocessing target)."""
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(Worker(conn).serve())


class WorkerHandle:
    """The coordinator's end of one worker process: one request, one reply, bounded."""

    def __init__(self, index: int, proc: BaseProcess, parent: Connection) -> None:
        self.index = index
        self.conn = parent
        self.proc = proc
        self._lock = asyncio.Lock()
        self._broken = False

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    async def call(self, wait: float, **command: Any) -> dict[str, Any]:
        """Send one command; its reply, or TimeoutError after ``wait`` seconds.

        The exchange is shielded: a caller cancelled mid-way (the progress ticker) leaves the
        reply to be read, so the next command never gets an earlier command's answer.
        """
        reply = await asyncio.shield(asyncio.ensure_future(self._exchange(wait, command)))
        if "error" in reply:
            raise RuntimeError(f"load generator {self.index}: {reply['error']}")
        return reply

    async def _exchange(self, timeout: float, command: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._broken:
                raise RuntimeError(f"load generator {self.index} stopped answering earlier")
            self.conn.send(command)
            return await loop.run_in_executor(None, self._recv, timeout)

    def _recv(self, timeout: float) -> dict[str, Any]:
        try:
            if not self.conn.poll(timeout):
                self._broken = True  # A late reply would answer the next command.
                raise TimeoutError(
                    f"load generator {self.index} did not answer in {timeout:.0f}s")
            reply: dict[str, Any] = self.conn.recv()
        except EOFError:
            self._broken = True
            raise RuntimeError(f"load generator {self.index} exited") from None
        return reply

    def stop(self) -> None:
        """Ask the worker to exit; terminate it (by its PID) if it does not within 5 s."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send({"op": "exit"})
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


def start_workers(count: int) -> list[WorkerHandle]:
    """Spawn ``count`` worker processes (spawn: no event loop state crosses the fork)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    handles = []
    for index in range(count):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(child,), daemon=True,
                           name=f"roomcast-bench-client-{index}")
        proc.start()
        child.close()
        handles.append(WorkerHandle(index, proc, parent))
    return handles

