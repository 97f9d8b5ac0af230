"""The node's local rooms: which connections are in each room here, and fan-out to them.

``Rooms`` holds a broker subscription for every room with at least one local member (reference
counted: subscribed on the first member, unsubscribed after a short linger once the room is empty).
A publication is encoded once per codec present in the room and written to that codec's members
through the transport's ``Fanout`` as one pre-built frame: never an ``await send()`` per member,
never an encode per member.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
import structlog

from roomcast import clock
from roomcast.backends.broker import Broker, BrokerUnavailable, Publication
from roomcast.metrics import Metrics
from roomcast.protocol import dialects, envelopes
from roomcast.service.connection import Connection, Fanout
from roomcast.service.recovery import Position

log = structlog.get_logger("roomcast.rooms")



#: Turns a native envelope (decoded) into a compatibility dialect's bytes; None = not shown.
Encoder = Callable[[dict[str, Any]], bytes | None]


class Room:
    """One room's local state: members grouped by codec, joiners still replaying, position."""

    __slots__ = ("backlog", "floors", "members", "name", "pending", "position", "refilled",
                 "retired")

    def __init__(self, name: str) -> None:
        self.name = name
        # codec -> {connection: None}; dicts keep join order and give O(1) removal.
        self.members: dict[str, dict[Connection, None]] = {}
        # Connections replaying history: live publications queue here until the hand-over.
        self.pending: dict[Connection, list[Publication]] = {}
        self.position = Position()
        #: Joined members whose history read was ahead of ``position``: stored publications up to
        #: their floor already reached them in the hand-over (recovery.join_with_replay).
        self.floors: dict[Connection, Position] = {}
        # While not None, the room is refilling from history after a resubscribe
        # (recovery.catch_up): publications queue here and are delivered after the refill.
        self.backlog: list[Publication] | None = None
        #: Set when that refill is over (joins wait for it before reading their position).
        self.refilled: asyncio.Event | None = None
        #: An epoch whose history went back (recovery._refill): its publications are dropped.
        self.retired = ""

    def __len__(self) -> int:
        return sum(len(group) for group in self.members.values()) + len(self.pending)

    def connections(self) -> Iterable[Connection]:
        for group in self.members.values():
            yield from group
        yield from self.pending

    def is_replaying(self, conn: Connection) -> bool:
        return conn in self.pending


class Rooms:
    """Local membership and fan-out. All methods run on the event loop thread."""

    def __init__(
        self,
        broker: Broker,
        fanout: Fanout,
        metrics: Metrics,
        linger: float = 2.0,
        encoders: Mapping[str, Encoder] | None = None,
    ) -> None:
        #: Called with a room and the publication that skipped past its position (a gap); the
        #: service starts a refill from history (recovery.begin_refill). None: no detection.
        self.on_gap: Callable[[Room, Publication], None] | None = None
        self._broker = broker
        self._fanout = fanout
        self._metrics = metrics
        self._linger = linger
        self._encoders = dict(encoders or {})
        self._rooms: dict[str, Room] = {}
        self._unsubscribe_timers: dict[str, asyncio.TimerHandle] = {}
        self._subscribing: dict[str, asyncio.Task[None]] = {}

    def get(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def local_counts(self) -> dict[str, int]:
        return {name: len(room) for name, room in self._rooms.items()}

    # --- membership --------------------------------------------------------------------------

    async def join(self, room_name: str, conn: Connection, *, replaying: bool = False) -> Room:
        """Add ``conn`` to the room, subscribing the room first if this node had no member.

        With ``replaying`` the connection is held as pending: publications queue for it until
        finish_replay(). Raises BrokerUnavailable when the subscription cannot be made live.
        """
        room = self._rooms.get(room_name)
        if room is None:
            room = self._rooms[room_name] = Room(room_name)
            self._metrics.rooms.set(len(self._rooms))
        timer = self._unsubscribe_timers.pop(room_name, None)
        if timer is not None:
            timer.cancel()
        # Hold the place before awaiting, so that a concurrent leave of the last member does not
        # unsubscribe under us.
        room.pending[conn] = []
        try:
            await self._ensure_subscribed(room_name)
        except BaseException:
            room.pending.pop(conn, None)
            self._maybe_release(room)
            raise
        if not replaying:
            self._promote(room, conn)
        return room

    async def _ensure_subscribed(self, room_name: str) -> None:
        task = self._subscribing.get(room_name)
        if task is None:
            task = asyncio.ensure_future(self._broker.subscribe(room_name))
            self._subscribing[room_name] = task
            task.add_done_callback(lambda _t: self._subscribing.pop(room_name, None))
        await asyncio.shield(task)

    def _promote(self, room: Room, conn: Connection) -> list[Publication]:
        queued = room.pending.pop(conn, [])
        group = room.members.setdefault(conn.codec, {})
        self._fanout.joined(group, conn)  # What was delivered before it joined is not for it.
        group[conn] = None
        return queued

    def finish_replay(self, room_name: str, conn: Connection) -> list[Publication]:
        """Make a replaying connection a live member; returns the publications queued for it.

        The caller sends them before anything else can reach the connection: this method and the
        caller's hand-off run without yielding to the loop (recovery.join_with_replay).
        """
        return self._promote(self._rooms[room_name], conn)

    def leave(self, room_name: str, conn: Connection) -> None:
        room = self._rooms.get(room_name)
        if room is None:
            return
        group = room.members.get(conn.codec)
        if group is not None:
            if conn in group:  # What was delivered while it was a member is still for it.
                self._fanout.leaving(group, conn)
            group.pop(conn, None)
            if not group:
                del room.members[conn.codec]
        room.pending.pop(conn, None)
        room.floors.pop(conn, None)
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
        room = self._rooms.get(room_name)
        if room is None or len(room):
            return
        del self._rooms[room_name]
        self._metrics.rooms.set(len(self._rooms))
        task = asyncio.ensure_future(self._unsubscribe(room_name))
        task.add_done_callback(_log_task_error)

    async def _unsubscribe(self, room_name: str) -> None:
        if room_name in self._rooms:  # Rejoined while the linger ran out.
            return
        with contextlib.suppress(BrokerUnavailable):
            await self._broker.unsubscribe(room_name)

    async def close(self) -> None:
        for timer in self._unsubscribe_timers.values():
            timer.cancel()
        self._unsubscribe_timers.clear()

    # --- fan-out -----------------------------------------------------------------------------

    def deliver(self, publication: Publication) -> None:
        """Send one publication to every local member of its room (called by the broker)."""
        room = self._rooms.get(publication.room)
        if room is None:
            return
        if room.backlog is not None:  # Refilling after a resubscribe: this comes after.
            room.backlog.append(publication)
            return
        if room.retired and publication.epoch == room.retired and publication.offset:
            return  # Its offsets may name messages already delivered: the members were told.
        if self.on_gap is not None and room.position.skips_to(publication):
            self.on_gap(room, publication)  # Queued behind a refill of what is missing.
            return
        if not room.position.advance(publication):
            return  # Already delivered (a refill overlapping live ones): exactly once.
        for queue in room.pending.values():
            queue.append(publication)
        decoded: dict[str, Any] | None = None
        sent = 0
        skip = publication.origin if publication.offset == 0 else ""
        below: set[Connection] | None = None
        if room.floors and publication.offset:
            below = self._below_floor(room, publication)
        for codec, group in room.members.items():
            if codec == dialects.NATIVE:
                payload: bytes | None = publication.payload
            else:
                if decoded is None:
                    decoded = orjson.loads(publication.payload)
                payload = self._encoders[codec](decoded)
            if payload is not None:
                targets = group if not below else [c for c in group if c not in below]
                sent += self._fanout.send(targets, payload, skip)
        self._metrics.messages_out.inc(sent)
        if publication.ts_us:
            self._metrics.fanout_latency.observe((clock.now_us() - publication.ts_us) / 1e6)

    @staticmethod
    def _below_floor(room: Room, publication: Publication) -> set[Connection] | None:
        """The members that already got ``publication`` in their hand-over; floors it passes
        are dropped (the stream is in order: nothing below them comes any more)."""
        below: set[Connection] = set()
        for conn, floor in list(room.floors.items()):
            if floor.epoch == publication.epoch and publication.offset <= floor.offset:
                below.add(conn)
            if floor.epoch != publication.epoch or publication.offset >= floor.offset:
                del room.floors[conn]
        return below or None

    def announce_gap(self, room: Room, until: Position) -> None:
        """Tell the room's live members that messages up to ``until`` may never reach them, and
        move the room's position there (what follows is delivered from it)."""
        room.position = Position(until.offset, until.epoch)
        group = room.members.get(dialects.NATIVE)
        if group:
            self._fanout.send(group, envelopes.gap(room.name, until.offset, until.epoch))
        self.count_gap("lost")

    def count_gap(self, outcome: str) -> None:
        self._metrics.gaps.labels(outcome=outcome).inc()


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())
