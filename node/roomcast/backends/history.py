"""The history seam: each room's offsets, epoch and newest stored messages, for replay.

Every stored message of a room gets the next offset (1, 2, 3, ...) within the room's epoch; an
epoch is a random label that changes whenever the room's history is lost or expires, so that a
client position ``{offset, epoch}`` from before can never be continued by mistake. The broker
assigns offsets as it publishes (``MemoryHistory.append`` here, lua/publish.lua in Redis);
``History.read`` is what a node asks for replay and recovery. ``RedisHistory``
(history_redis.py) reads the same layout from Redis streams.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from roomcast.clock import Clock, monotonic
from roomcast.protocol.envelopes import Since, finish_message

#: A room's (history size, history TTL in seconds), from its namespace (namespaces.py).
Retention = Callable[[str], tuple[int, float]]


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """A room's position (last offset, epoch) and the stored envelopes asked for.

    ``recovered`` is False when a ``since`` position could not be continued without a gap: its
    epoch is not the room's, or messages after it were already trimmed or expired. ``messages``
    is then empty.
    """

    offset: int
    epoch: str
    messages: list[bytes] = field(default_factory=list)
    recovered: bool = True


class History(Protocol):
    """What a node reads of a room's stored messages."""

    async def read(
        self, room: str, since: Since | None = None, limit: int | None = None
    ) -> HistoryResult:
        """Stored messages after ``since`` (the oldest ``limit`` of them), or without ``since``
        the newest ``limit`` (all kept when None), oldest first, with the room's position.

        A room never published to has offset 0 and an epoch, so that a position read now can be
        continued later. Raises BrokerUnavailable when the store is unreachable.
        """

    async def restart_epoch(self, room: str, epoch: str) -> str:
        """The room's history is no longer what this node delivered in ``epoch`` (a Redis
        failover lost the newest writes, or a deposed master ran a late publish): start a new
        epoch (stored messages dropped, offsets from 1 again), so that no offset names two
        messages. Compare-and-set: if the room is no longer in ``epoch`` (another node restarted
        it), nothing changes. Returns the room's epoch afterwards, never ``epoch``."""

    async def close(self) -> None:
        """Release what the store holds of its own (before the clients it shares close)."""


def new_epoch() -> str:
    """A short random epoch label (hex: safe to splice into JSON unescaped).

    Not a secret (every message shows its epoch), only unlikely to repeat: random's generator,
    seeded from the OS at start, not secrets', which reads the OS on every call. Redis nodes
    make one for every publish (used only if the room has no epoch yet), where the system call
    was 4% of the publishing node's time."""
    return f"{random.getrandbits(32):08x}"


def recovery_result(
    offset: int, epoch: str, first_offset: int, messages: list[bytes], since: Since | None
) -> HistoryResult:
    """Decide whether ``since`` can be continued, given what the room still stores.

    ``first_offset`` is the oldest stored offset (0 when nothing is stored).
    """
    if since is None:
        return HistoryResult(offset, epoch, messages)
    if since.offset == offset and since.epoch == epoch:
        return HistoryResult(offset, epoch, [])
    continuous = (
        since.epoch == epoch
        and since.offset < offset
        and first_offset != 0
        and first_offset <= since.offset + 1
    )
    return HistoryResult(offset, epoch, messages if continuous else [], continuous)


#: Seconds between sweeps of expired rooms out of a MemoryHistory. A constant: it bounds how
#: long an expired room's few hundred bytes linger, not when the room expires.
SWEEP_INTERVAL = 60.0


class _Room:
    __slots__ = ("epoch", "expires_at", "offset", "stored")

    def __init__(self, size: int, expires_at: float | None) -> None:
        self.offset = 0
        self.epoch = new_epoch()
        self.stored: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=size)
        #: Monotonic time after which the room's history is gone (None: never).
        self.expires_at = expires_at


class MemoryHistory:
    """History inside one process: the embedded default.

    ``ttl`` seconds after a room's last publication its history is gone and it gets a new epoch
    (0 = never). A room only read, never published to, is forgotten ``idle_ttl`` seconds after
    its last read, so that asking about many room names keeps no memory. Expired rooms are swept
    out every SWEEP_INTERVAL seconds. ``clock`` is injectable so that tests can move time.
    """

    def __init__(
        self, size: int = 100, ttl: float = 86400.0, clock: Clock = monotonic,
        idle_ttl: float = 300.0, retention: Retention | None = None,
    ) -> None:
        self._size = size
        self._ttl = ttl
        #: Per-room (size, TTL) (the room's namespace); None: ``size`` and ``ttl`` everywhere.
        self._retention = retention
        self._idle_ttl = idle_ttl
        self._clock = clock
        self._rooms: dict[str, _Room] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL

    def __len__(self) -> int:
        """Rooms held (expired ones until the next sweep)."""
        return len(self._rooms)

    def _room(self, room: str) -> _Room:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        state = self._rooms.get(room)
        if state is None or (state.expires_at is not None and now > state.expires_at):
            # A new room, or one whose history expired: a new epoch tells clients so.
            size = self._retention(room)[0] if self._retention else self._size
            state = self._rooms[room] = _Room(size, now + self._idle_ttl)
        elif state.offset == 0:
            state.expires_at = now + self._idle_ttl  # Still read: keep its epoch for a while.
        return state

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL
        expired = [name for name, state in self._rooms.items()
                   if state.expires_at is not None and now > state.expires_at]
        for name in expired:
            del self._rooms[name]

    def append(self, room: str, prefix: bytes) -> tuple[int, str, bytes]:
        """Give the next message of ``room`` its offset and store it; returns (offset, epoch,
        the finished envelope). What lua/publish.lua does in Redis."""
        state = self._room(room)
        state.offset += 1
        ttl = self._retention(room)[1] if self._retention else self._ttl
        state.expires_at = self._clock() + ttl if ttl > 0 else None
        payload = finish_message(prefix, state.offset, state.epoch)
        if state.stored.maxlen:
            state.stored.append((state.offset, payload))
        return state.offset, state.epoch, payload

    async def restart_epoch(self, room: str, epoch: str) -> str:
        state = self._room(room)
        if state.epoch == epoch:
            state.epoch, state.offset = new_epoch(), 0
            state.stored.clear()
        return state.epoch

    async def close(self) -> None:
        """Nothing to release."""

    async def read(
        self, room: str, since: Since | None = None, limit: int | None = None
    ) -> HistoryResult:
        state = self._room(room)
        stored = list(state.stored)
        first = stored[0][0] if stored else 0
        if since is None:
            picked = stored[-limit:] if limit else stored
        else:
            picked = [entry for entry in stored if entry[0] > since.offset]
            if limit:
                picked = picked[:limit]
        return recovery_result(
            state.offset, state.epoch, first, [payload for _, payload in picked], since
        )
