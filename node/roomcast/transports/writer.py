"""Fan-out at the frame level: one WebSocket frame per message per node, written to every member.

A server's frames are not masked (RFC 6455 section 5.1), so a text frame's bytes are the same
for every connection that did not negotiate an extension. ``text_frame`` builds them once; the
``FrameWriter`` appends them to each open connection's pending list and writes each list with one
``transport.write`` at the end of the event-loop iteration, so that a burst of publications costs
one syscall per connection instead of one per message. Connections that are closing or closed,
or that negotiated permessage-deflate, are never written raw: the first are skipped, the second go
through the websockets protocol object.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.protocol import OPEN

from roomcast.metrics import Metrics
from roomcast.protocol.closecodes import CloseCode

if TYPE_CHECKING:
    from roomcast.transports.session import Session

log = structlog.get_logger("roomcast.writer")

#: Least seconds between two flushes: the first frames after a quiet spell go out on the next
#: loop turn; under load, whatever arrives within this interval of the last flush waits for
#: the next one and shares its writes (one syscall per connection). It bounds what the
#: coalescing adds to a message's latency.
FLUSH_INTERVAL = 0.001

_TEXT_FIN = 0x81  # FIN bit + opcode 0x1 (text), RFC 6455 section 5.2.


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked, unfragmented text frame carrying ``payload`` (RFC 6455 §5.2)."""
    length = len(payload)
    if length < 126:
        header = bytes((_TEXT_FIN, length))
    elif length < 65536:
        header = struct.pack("!BBH", _TEXT_FIN, 126, length)
    else:
        header = struct.pack("!BBQ", _TEXT_FIN, 127, length)
    return header + payload


def raw_writable(ws: ServerConnection) -> bool:
    """True when pre-built frames may be written to ``ws``'s transport directly."""
    return (
        ws.protocol.state is OPEN
        and not ws.protocol.extensions
        and ws.send_in_progress is None
    )


class FrameWriter:
    """Coalescing writer of pre-built frames; one per node, used on the event loop thread."""

    def __init__(self, interval: float = FLUSH_INTERVAL) -> None:
        #: Frames waiting for the next flush, per connection (SessionFanout appends to them).
        self.pending: dict[ServerConnection, list[bytes]] = {}
        self._scheduled = False
        self._interval = interval
        self._flushed_at = 0.0
        #: Called before anything is written (SessionFanout.settle): queued room-wide frames
        #: join the connections' pending lists first, so that nothing overtakes them.
        self.before_write: Callable[[], None] | None = None
        #: Called before a write to one connection (SessionFanout.settle_one): its share of
        #: the queued room-wide frames joins its pending list first.
        self.before_write_one: Callable[[ServerConnection], None] | None = None
        #: Writes made and frames written, for tests and the benchmark.
        self.writes = 0
        self.frames = 0

    def send(self, connections: Iterable[ServerConnection], payload: bytes) -> int:
        """Queue ``payload`` as one text frame to each connection; returns how many it reached.

        The frame is built once. Connections not in the OPEN state are skipped; ones with an
        extension get the message through websockets (compressed per connection).
        """
        frame: bytes | None = None
        reached = 0
        for ws in connections:
            if raw_writable(ws):
                if frame is None:
                    frame = text_frame(payload)
                self.queue(ws, frame, 1)
                reached += 1
            elif ws.protocol.state is OPEN:
                self.write_now(ws, payload)
                reached += 1
        if self.pending:
            self.schedule()
        return reached

    def queue(self, ws: ServerConnection, data: bytes, frames: int) -> None:
        """Append ``data`` (``frames`` complete frames) to what is pending for ``ws``; the
        caller checked raw_writable and schedules the flush."""
        queue = self.pending.get(ws)
        if queue is None:
            self.pending[ws] = [data]
        else:
            queue.append(data)
        self.frames += frames

    def schedule(self) -> None:
        """Flush on the next loop turn, or FLUSH_INTERVAL after the last flush if that is later.

        Under load the flushes also batch by themselves: while one writes to every member, what
        arrives waits in the sockets and is read, and delivered, as one batch after it. (A pause
        after each flush as long as it took was measured: it cut little CPU and doubled p99 at
        1000 subscribers x 50 msg/s.)"""
        if not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            wait = self._flushed_at + self._interval - loop.time()
            if wait > 0:  # Busy: what comes in meanwhile goes out in the same writes.
                loop.call_later(wait, self.flush)
            else:
                loop.call_soon(self.flush)

    def write_now(self, ws: ServerConnection, payload: bytes) -> None:
        """Write ``payload`` to one connection at once, after what is pending for it, so a
        reply never overtakes a publication queued before it. Does not yield."""
        self.write_pending(ws)
        self.write_extended(ws, payload)

    def write_soon(self, ws: ServerConnection, payload: bytes) -> None:
        """Queue ``payload`` for ``ws`` after what fan-out holds for it (its share of the
        queued room-wide frames joins its pending list first), written by the next flush;
        a reply sent after it flushes it first (write_now), a close writes it first
        (write_pending). Through the extension, at once, where ``ws`` has one."""
        if not raw_writable(ws):
            self.write_now(ws, payload)
            return
        if self.before_write_one is not None:
            self.before_write_one(ws)
        self.queue(ws, text_frame(payload), 1)
        self.schedule()

    def write_extended(self, ws: ServerConnection, payload: bytes) -> None:
        """Write ``payload`` to ``ws`` now, through its extension if it negotiated one."""
        if raw_writable(ws):
            ws.transport.write(text_frame(payload))
        elif ws.protocol.state is OPEN and ws.send_in_progress is None:
            ws.protocol.send_text(payload)  # Through the extension (compression).
            ws.send_data()

    def write_pending(self, ws: ServerConnection) -> None:
        """Write everything fan-out holds for ``ws`` now (before its close frame)."""
        if self.before_write_one is not None:
            self.before_write_one(ws)
        self.flush_one(ws)

    def flush_one(self, ws: ServerConnection) -> None:
        """Write what is pending for ``ws`` now (before a reply, to keep the order)."""
        frames = self.pending.pop(ws, None)
        if frames:
            self._write(ws, frames)

    def flush(self) -> None:
        """Write every connection's pending frames, one write per connection."""
        self._scheduled = False
        self._flushed_at = asyncio.get_running_loop().time()
        if self.before_write is not None:
            self.before_write()
        pending, self.pending = self.pending, {}
        for ws, frames in pending.items():
            self._write(ws, frames)

    def _write(self, ws: ServerConnection, frames: list[bytes]) -> None:
        # A close that started since the frames were queued wins: nothing may follow a close
        # frame (RFC 6455 section 5.5.1). The client recovers those messages from history.
        if ws.protocol.state is not OPEN:
            return
        ws.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        self.writes += 1


class SendBudget:
    """The slow-consumer policy, one rule for fan-out and for every single-client write.

    A client with more than ``max_send_buffer`` bytes waiting in its transport's write buffer
    is closed with 4000 and written nothing more: it is cut off, never waited for. Checked
    before each write, so what a client can hold in the node is ``max_send_buffer`` plus one
    write (a message, or a reply of at most --max-reply-size).
    """

    def __init__(self, metrics: Metrics, max_send_buffer: int) -> None:
        self._metrics = metrics
        self.max_send_buffer = max_send_buffer

    def admits(self, session: Session) -> bool:
        """True when ``session`` may be written to now; False when it is being cut off."""
        if session.slow:
            return False
        if session.ws.transport.get_write_buffer_size() > self.max_send_buffer:
            self.cut(session)
            return False
        return True

    def cut(self, session: Session) -> None:
        """A client that cannot keep up is closed with 4000, never waited for."""
        if session.slow:
            return
        session.slow = True
        self._metrics.errors.labels(code="slow_consumer").inc()
        log.info("closing slow consumer", conn_id=session.conn_id,
                 buffered=session.ws.transport.get_write_buffer_size())
        session.close(CloseCode.SLOW_CONSUMER, "slow consumer")


class SessionFanout:
    """The service's ``Fanout`` over WebSocket sessions: the slow-consumer policy, then one
    pre-built frame per message through the node's ``FrameWriter``.

    A room's member group (the dict Rooms keeps per codec) is not walked per message: its
    messages queue in an outbox of the group, and ``settle`` (before the writer flushes) hands
    each member all of them as one joined chunk, after one look at its send budget. A burst of
    N messages to M members thus costs M appends, not N x M. Each outbox knows, per member
    that joined, left or was written to since it opened, from which of its messages on that
    member's share starts: a member that joins gets only what is queued after it joined
    (``joined``), one that leaves gets its share at once (``leaving``), and a reply to one
    member first takes that member's share (``settle_one``): all O(1) or O(messages), never
    O(members). The slow-consumer check is made per settle, so a client can hold
    --max-send-buffer plus what reached its room in one flush interval.
    """

    def __init__(self, writer: FrameWriter, metrics: Metrics, max_send_buffer: int) -> None:
        self.writer = writer
        self.budget = SendBudget(metrics, max_send_buffer)
        self._metrics = metrics
        #: id(group) -> its outbox; holding the group keeps its id unique.
        self._outbox: dict[int, _Outbox] = {}
        #: The sequence number of the last queued message: the order across groups.
        self._seq = 0
        writer.before_write = self.settle
        writer.before_write_one = self.settle_one

    def send(self, connections: Iterable[Any], payload: bytes, skip: str = "") -> int:
        if type(connections) is dict:  # A room's member group: queued once for all of them.
            box = self._outbox.get(id(connections))
            self._seq += 1
            if box is None:
                self._outbox[id(connections)] = _Outbox(connections, payload, skip, self._seq)
                self.writer.schedule()
            else:
                box.entries.append((payload, skip))
                box.seqs.append(self._seq)
            return 0  # Counted in roomcast_messages_out when settled.
        self.settle()  # A list of some members (rare): in order after what is queued.
        targets = []
        budget = self.budget
        limit = budget.max_send_buffer
        for session in connections:
            if (skip and session.conn_id == skip) or session.slow:
                continue
            # SendBudget.admits, inlined: this loop runs once per member per message.
            if session.ws.transport.get_write_buffer_size() > limit:
                budget.cut(session)
                continue
            targets.append(session.ws)
        return self.writer.send(targets, payload)

    def joined(self, group: dict[Any, None], session: Any) -> None:
        """``session`` is joining ``group``: what is queued so far is not for it."""
        box = self._outbox.get(id(group))
        if box is not None:
            box.starts[session] = len(box.entries)

    def leaving(self, group: dict[Any, None], session: Any) -> None:
        """``session`` is leaving ``group``: its share of what is queued goes to it now."""
        box = self._outbox.get(id(group))
        if box is not None:
            self._hand([box], session)

    def settle_one(self, ws: ServerConnection) -> None:
        """Before a reply to ``ws``: its share of every outbox goes into its pending writes."""
        session = getattr(ws, "session", None)
        if session is None:
            return
        boxes = [box for box in self._outbox.values() if session in box.group]
        if boxes:
            self._hand(boxes, session)

    def settle(self) -> None:
        """Hand every queued group message to its members' pending writes, in order: a member
        of several groups with queued messages gets them merged in the order they were sent."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        shared: dict[Any, list[_Outbox]] = {}
        if len(outbox) > 1:
            first: dict[Any, _Outbox] = {}
            for box in outbox.values():
                for session in box.group:
                    other = first.setdefault(session, box)
                    if other is not box:
                        shared.setdefault(session, [other]).append(box)
        for box in outbox.values():
            self._deal(box, shared)
        for session, boxes in shared.items():
            self._hand(boxes, session)

    def _deal(self, box: _Outbox, shared: dict[Any, list[_Outbox]]) -> None:
        """Give each member of ``box`` (but those in ``shared``, merged by the caller) its
        messages as one chunk. This loop runs once per member per flush, so its common case,
        an open connection without extension that has nothing else pending, is written at
        once (no second pass through the writer's pending lists) and counted once per box;
        the rest takes _hand or _queue."""
        frames = box.frames()
        count = len(frames)
        chunk = frames[0] if count == 1 else b"".join(frames)
        pending = self.writer.pending
        budget = self.budget
        limit = budget.max_send_buffer
        whole, starts = not box.skips, box.starts
        written = dealt = 0
        for session in box.group:
            if session in shared:
                continue  # Merged with its other groups' messages.
            if not whole or session in starts:
                self._hand([box], session)
                continue
            if session.slow:
                continue
            ws = session.ws
            transport = ws.transport
            if transport.get_write_buffer_size() > limit:
                budget.cut(session)
                continue
            protocol = ws.protocol
            if protocol.extensions or ws.send_in_progress is not None:
                self._queue(session, chunk, count, box.entries)
                continue
            if protocol.state is not OPEN:
                continue
            queue = pending.get(ws)
            if queue is None:
                transport.write(chunk)
                written += 1
            else:  # After what is pending for it, which the flush writes next.
                queue.append(chunk)
            dealt += 1
        self.writer.writes += written
        self.writer.frames += dealt * count
        self._metrics.messages_out.inc(dealt * count)

    def _share(self, box: _Outbox, session: Any) -> list[tuple[int, bytes, bytes]]:
        """``session``'s entries of ``box`` from its start on, as (sequence, frame, payload),
        skipping its own events; moves its start past them."""
        start = box.starts.get(session, 0)
        box.starts[session] = len(box.entries)
        frames = box.frames()
        conn_id = session.conn_id
        return [(box.seqs[i], frames[i], box.entries[i][0])
                for i in range(start, len(box.entries)) if box.entries[i][1] != conn_id]

    def _hand(self, boxes: list[_Outbox], session: Any) -> None:
        """Give ``session`` its entries of ``boxes`` (one, or each group it is in that has
        messages queued) from its start on, in the order they were sent, and move its starts
        past them."""
        share = [entry for box in boxes for entry in self._share(box, session)]
        if len(boxes) > 1:
            share.sort(key=lambda entry: entry[0])
        if share:
            self._queue(session, b"".join(f for _, f, _ in share), len(share),
                        [(p, "") for _, _, p in share])

    def _queue(self, session: Any, data: bytes, count: int,
               entries: list[tuple[bytes, str]]) -> None:
        if session.slow:
            return
        ws = session.ws
        if ws.transport.get_write_buffer_size() > self.budget.max_send_buffer:
            self.budget.cut(session)
            return
        if raw_writable(ws):
            self.writer.queue(ws, data, count)
        elif ws.protocol.state is OPEN:  # Compressed: each message through websockets.
            self.writer.flush_one(ws)
            for payload, _ in entries:
                self.writer.write_extended(ws, payload)
        else:
            return
        self._metrics.messages_out.inc(count)


class _Outbox:
    """The messages queued for one member group since its last settle."""

    __slots__ = ("_frames", "entries", "group", "seqs", "skips", "starts")

    def __init__(self, group: dict[Any, None], payload: bytes, skip: str, seq: int) -> None:
        self.group = group
        #: (payload, conn_id of the member it must skip, or "").
        self.entries: list[tuple[bytes, str]] = [(payload, skip)]
        #: Each entry's sequence number (SessionFanout._seq), to merge a member's groups.
        self.seqs: list[int] = [seq]
        #: member -> index of its first entry not yet handed to it (joined or served since).
        self.starts: dict[Any, int] = {}
        self.skips = bool(skip)
        self._frames: list[bytes] = []

    def frames(self) -> list[bytes]:
        """The entries as frames, built once each."""
        entries, frames = self.entries, self._frames
        if len(frames) < len(entries):
            frames.extend(text_frame(payload) for payload, _ in entries[len(frames):])
            self.skips = self.skips or any(skip for _, skip in entries)
        return frames
