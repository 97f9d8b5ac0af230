"""The node's local rooms: who is in each room on this node, and fan-out of publications to them.

The hub holds a broker subscription for every room with at least one local member (reference
counted: subscribed on the first member, unsubscribed after a short linger once the room is empty).
A publication is delivered to each dialect's members as one pre-built frame (node/fanout.py):
never an ``await send()`` per member, and never an encode per member.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from node.broker import Broker, BrokerUnavailable, Publication, now_us
from node.closecodes import CloseCode
from node.fanout import FrameWriter

if TYPE_CHECKING:
    from node.metrics import Metrics
    from node.session import Session

log = structlog.get_logger("roomcast.hub")


class Room:
    """One room's local state: members grouped by dialect, and the last offset delivered."""

    __slots__ = ("epoch", "members", "name", "offset", "pending")

    def __init__(self, name: str) -> None:
        self.name = name
        # dialect name -> {session: None}; dicts keep join order and give O(1) removal.
        self.members: dict[str, dict[Session, None]] = {}
        # Sessions replaying history: live publications queue here until the replay is done.
        self.pending: dict[Session, list[Publication]] = {}
        self.offset = 0
        self.epoch = ""

    def __len__(self) -> int:
        return sum(len(group) for group in self.members.values()) + len(self.pending)

    def sessions(self) -> Iterable[Session]:
        for group in self.members.values():
            yield from group
        yield from self.pending


class Hub:
    """Local membership and fan-out. All methods run on the event loop thread."""

    def __init__(
        self,
        broker: Broker,
        metrics: Metrics,
        linger: float = 2.0,
        encoders: Mapping[str, Callable[[dict[str, Any]], bytes | None]] | None = None,
        max_send_buffer: int = 1 << 20,
    ) -> None:
        self._max_send_buffer = max_send_buffer
        self.writer = FrameWriter()
        self._broker = broker
        self._metrics = metrics
        self._linger = linger
        self._encoders = encoders or {}
        self.rooms: dict[str, Room] = {}
        self._unsubscribe_timers: dict[str, asyncio.TimerHandle] = {}
        self._subscribing: dict[str, asyncio.Task[None]] = {}

    # --- membership --------------------------------------------------------------------------

    async def join(self, room_name: str, session: Session, *, replaying: bool = False) -> Room:
        """Add ``session`` to the room, subscribing the room first if this node had no member.

        With ``replaying`` the session is held as pending: publications queue for it until
        finish_replay(). Raises BrokerUnavailable when the subscription cannot be made live.
        """
        room = self.rooms.get(room_name)
        if room is None:
            room = self.rooms[room_name] = Room(room_name)
            self._metrics.rooms.set(len(self.rooms))
        timer = self._unsubscribe_timers.pop(room_name, None)
        if timer is not None:
            timer.cancel()
        # Hold the place before awaiting, so that a concurrent leave of the last member does not
        # unsubscribe under us.
        room.pending[session] = []
        try:
            await self._ensure_subscribed(room_name)
        except BaseException:
            room.pending.pop(session, None)
            self._maybe_release(room)
            raise
        if not replaying:
            self._promote(room, session)
        return room

    async def _ensure_subscribed(self, room_name: str) -> None:
        task = self._subscribing.get(room_name)
        if task is None:
            task = asyncio.ensure_future(self._broker.subscribe(room_name))
            self._subscribing[room_name] = task
            task.add_done_callback(lambda _t: self._subscribing.pop(room_name, None))
        await asyncio.shield(task)

    def _promote(self, room: Room, session: Session) -> list[Publication]:
        queued = room.pending.pop(session, [])
        room.members.setdefault(session.dialect, {})[session] = None
        return queued

    def take_pending(self, room_name: str, session: Session) -> list[Publication]:
        """Hand over what queued for a replaying session so far (it stays pending)."""
        room = self.rooms[room_name]
        queued = room.pending.get(session, [])
        room.pending[session] = []
        return queued

    def finish_replay(self, room_name: str, session: Session) -> list[Publication]:
        """Make a replaying session a live member; returns the publications still queued.

        The caller sends the returned publications before anything else can reach the session:
        this method and the caller's synchronous hand-off run without yielding to the loop.
        """
        return self._promote(self.rooms[room_name], session)

    def leave(self, room_name: str, session: Session) -> None:
        room = self.rooms.get(room_name)
        if room is None:
            return
        group = room.members.get(session.dialect)
        if group is not None:
            group.pop(session, None)
            if not group:
                del room.members[session.dialect]
        room.pending.pop(session, None)
        self._maybe_release(room)

    def _maybe_release(self, room: Room) -> None:
        if len(room) or room.name in self._unsubscribe_timers:
            return
        loop = asyncio.get_running_loop()
        self._unsubscribe_timers[room.name] = loop.call_later(
            self._linger, self._release, room.name
        )

    def _release(self, room_name: str) -> None:
        self._unsubscribe_timers.pop(room_name, None)
        room = self.rooms.get(room_name)
        if room is None or len(room):
            return
        del self.rooms[room_name]
        self._metrics.rooms.set(len(self.rooms))
        task = asyncio.ensure_future(self._unsubscribe(room_name))
        task.add_done_callback(_log_task_error)

    async def _unsubscribe(self, room_name: str) -> None:
        if room_name in self.rooms:  # Rejoined while the linger ran out.
            return
        with contextlib.suppress(BrokerUnavailable):
            await self._broker.unsubscribe(room_name)

    async def close(self) -> None:
        for timer in self._unsubscribe_timers.values():
            timer.cancel()
        self._unsubscribe_timers.clear()

    def local_counts(self) -> dict[str, int]:
        return {name: len(room) for name, room in self.rooms.items()}

    # --- fan-out -----------------------------------------------------------------------------

    def deliver(self, publication: Publication) -> None:
        """Send one publication to every local member of its room (called by the broker)."""
        room = self.rooms.get(publication.room)
        if room is None:
            return
        if publication.offset:
            if publication.epoch == room.epoch and publication.offset <= room.offset:
                return  # Already delivered (a resubscribe replay); exactly once.
            room.offset, room.epoch = publication.offset, publication.epoch
        for queue in room.pending.values():
            queue.append(publication)
        decoded: dict[str, Any] | None = None
        sent = 0
        origin = publication.origin
        for dialect, group in room.members.items():
            if dialect == "native":
                payload: bytes | None = publication.payload
            else:
                if decoded is None:
                    decoded = orjson.loads(publication.payload)
                payload = self._encoders[dialect](decoded)
            if payload is None:
                continue
            targets = []
            for session in group:
                if publication.offset == 0 and session.conn_id == origin:
                    continue
                if session.ws.transport.get_write_buffer_size() > self._max_send_buffer:
                    self._cut_slow(session)
                    continue
                targets.append(session.ws)
            sent += self.writer.send(targets, payload)
        self._metrics.messages_out.inc(sent)
        if publication.ts_us:
            self._metrics.fanout_latency.observe((now_us() - publication.ts_us) / 1e6)

    def write(self, session: Session, payload: bytes) -> None:
        """Send one envelope to one client now, in order with its fan-out (FrameWriter)."""
        self.writer.write_now(session.ws, payload)

    def _cut_slow(self, session: Session) -> None:
        """A client that cannot keep up is closed with 1013, never waited for."""
        if session.slow:
            return
        session.slow = True
        self._metrics.errors.labels(code="slow_consumer").inc()
        log.info("closing slow consumer", conn_id=session.conn_id,
                 buffered=session.ws.transport.get_write_buffer_size())
        task = asyncio.ensure_future(
            session.ws.close(CloseCode.TRY_AGAIN_LATER, "slow consumer")
        )
        task.add_done_callback(_log_task_error)


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())
