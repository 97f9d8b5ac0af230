"""The Broker seam: how a publication reaches every node with members of a room.

A broker assigns each stored message its room offset, keeps the room's history, and hands every
publication to the node's ``on_publication`` callback. ``MemoryBroker`` (here) serves a lone node;
``RedisBroker`` (broker_redis.py) carries publications between the nodes of a cluster. Both pass
the contract tests in tests/test_broker_contract.py.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from node.protocol import Since, finish_message


class BrokerUnavailable(Exception):
    """The broker cannot accept the operation now (Redis is down); the client gets 'unavailable'."""


@dataclass(frozen=True, slots=True)
class Publication:
    """One publication as delivered to a node.

    ``payload`` holds the exact bytes every native member receives. ``offset`` is 0 for ephemeral
    events (typing, presence), which are not stored. ``origin`` is the sender's conn_id, so that
    "to the others" events can skip it. ``ts_us`` is the publish time (unix microseconds).
    """

    room: str
    payload: bytes
    offset: int = 0
    epoch: str = ""
    origin: str = ""
    ts_us: int = 0


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """A room's position (last offset, epoch) and the stored envelopes asked for.

    ``recovered`` is False when a ``since`` position could not be continued without a gap: its
    epoch is not the room's, or messages after it were already trimmed or expired.
    """

    offset: int
    epoch: str
    messages: list[bytes] = field(default_factory=list)
    recovered: bool = True


OnPublication = Callable[[Publication], None]


class Broker(Protocol):
    """What the node needs from a fan-out backend."""

    @property
    def available(self) -> bool:
        """False while the backend is unreachable; publishes then raise BrokerUnavailable."""

    async def start(self, on_publication: OnPublication) -> None:
        """Connect and start delivering publications of subscribed rooms to ``on_publication``."""

    async def close(self) -> None:
        """Stop delivering and release connections. Idempotent."""

    async def subscribe(self, room: str) -> None:
        """Deliver the room's publications from now on; returns once the subscription is live."""

    async def unsubscribe(self, room: str) -> None:
        """Stop delivering the room's publications."""

    async def publish(self, room: str, prefix: bytes, origin: str) -> Publication:
        """Store and publish a message (see protocol.message_prefix); returns it with its offset."""

    async def publish_event(self, room: str, payload: bytes, origin: str = "") -> None:
        """Publish an ephemeral event to the room's members on every node; not stored."""

    async def history(
        self, room: str, since: Since | None = None, limit: int | None = None
    ) -> HistoryResult:
        """Stored messages after ``since`` (all kept, or the newest ``limit`` without it)."""


def new_epoch() -> str:
    """A short random epoch label (hex: safe to splice into JSON unescaped)."""
    return secrets.token_hex(4)


def now_us() -> int:
    return time.time_ns() // 1000


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


class _MemoryRoom:
    __slots__ = ("epoch", "last_publish", "offset", "stored")

    def __init__(self, size: int) -> None:
        self.offset = 0
        self.epoch = new_epoch()
        self.stored: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=size)
        self.last_publish = time.monotonic()


class MemoryBroker:
    """Fan-out and history inside one process: the embedded default."""

    def __init__(self, history_size: int = 100, history_ttl: float = 86400.0) -> None:
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._rooms: dict[str, _MemoryRoom] = {}
        self._subscribed: set[str] = set()
        self._on_publication: OnPublication | None = None

    @property
    def available(self) -> bool:
        return self._on_publication is not None

    async def start(self, on_publication: OnPublication) -> None:
        self._on_publication = on_publication

    async def close(self) -> None:
        self._on_publication = None

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)

    def _room(self, room: str) -> _MemoryRoom:
        state = self._rooms.get(room)
        expired = (
            state is not None
            and self._history_ttl > 0
            and time.monotonic() - state.last_publish > self._history_ttl
        )
        if state is None or expired:
            # A new room, or one whose history expired: a new epoch tells clients so.
            state = self._rooms[room] = _MemoryRoom(self._history_size)
        return state

    def _deliver(self, publication: Publication) -> None:
        if self._on_publication is None:
            raise BrokerUnavailable("broker is closed")
        if publication.room in self._subscribed:
            self._on_publication(publication)

    async def publish(self, room: str, prefix: bytes, origin: str) -> Publication:
        if self._on_publication is None:
            raise BrokerUnavailable("broker is closed")
        state = self._room(room)
        state.offset += 1
        state.last_publish = time.monotonic()
        payload = finish_message(prefix, state.offset, state.epoch)
        if self._history_size > 0:
            state.stored.append((state.offset, payload))
        publication = Publication(room, payload, state.offset, state.epoch, origin, now_us())
        self._deliver(publication)
        return publication

    async def publish_event(self, room: str, payload: bytes, origin: str = "") -> None:
        self._deliver(Publication(room, payload, 0, "", origin, now_us()))

    async def history(
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
