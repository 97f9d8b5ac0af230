"""Factories that plug one backend implementation into the contract suites.

A test asks its ``backend`` (tests/contract/conftest.py) for what it needs and never names an
implementation: ``await backend.pair()`` gives a started broker with the history it stores into,
``await backend.presence("n1")`` a started presence store of node n1, ``await backend.advance(s)``
lets ``s`` seconds of history time pass. ``MemoryBackend`` builds the memory versions on a fake
clock; ``RedisBackend`` builds what ``roomcast.backends.build`` gives a clustered node, under a
key prefix of its own on a shared redis-server. Stores of one RedisBackend share that prefix,
as the nodes of one cluster do; the memory versions have no shared state, so tests that need
several nodes to see each other are Redis-only (test_*_cluster.py). A new implementation
joins every suite with a Backend subclass here and its id in conftest.py's params.

Every wait here is bounded; absence is proven with a barrier, never with a sleep.
"""

from __future__ import annotations

import abc
import asyncio
import io
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from roomcast.backends import build
from roomcast.backends.broker import Broker, MemoryBroker, Publication
from roomcast.backends.history import History, MemoryHistory
from roomcast.backends.presence import Member, MemoryPresence, PresenceStore
from roomcast.config import Config
from roomcast.protocol import envelopes as protocol
from tests.fakes import FakeClock

#: Longest wait for anything that should happen (a delivery, a user_left). A Redis node announces
#: user_left on its next presence tick (1 s) after the grace window, so this spans several ticks.
WAIT = 5.0
#: Presence grace window of the stores built here: short, so that user_left comes quickly.
GRACE = 0.3
#: Node lease of the Redis presence stores: longer than any test, so no live node is reaped.
LEASE = 30.0
#: History TTL when a test does not choose one: longer than any test.
DAY = 86400.0


def prefix(room: str, data: Any) -> bytes:
    """A message envelope without offset and epoch, as the service hands it to publish()."""
    return protocol.message_prefix(room, data, protocol.sender("u1", "Ann"), 1)


class Deliveries:
    """The node's on_publication/on_resubscribed callbacks: queues a test reads with a bound."""

    def __init__(self) -> None:
        self.publications: asyncio.Queue[Publication] = asyncio.Queue()
        self.resubscribed: asyncio.Queue[Collection[str]] = asyncio.Queue()

    def on_publication(self, publication: Publication) -> None:
        self.publications.put_nowait(publication)

    def on_resubscribed(self, rooms: Collection[str]) -> None:
        self.resubscribed.put_nowait(rooms)

    async def next(self, timeout: float = WAIT) -> Publication:
        """The next publication delivered; fails after ``timeout`` seconds without one."""
        return await asyncio.wait_for(self.publications.get(), timeout)


def fields(publication: Publication) -> tuple[str, bytes, int, str, str]:
    """What a publication says, leaving out its timestamp."""
    return (publication.room, publication.payload, publication.offset, publication.epoch,
            publication.origin)


async def assert_next_is(deliveries: Deliveries, expected: Publication) -> None:
    """The barrier: ``expected`` is the very next delivery, so nothing that was published
    before it (and should not have come) came first."""
    assert fields(await deliveries.next()) == fields(expected)


@dataclass
class Pair:
    """A broker and the history it stores into (one node's view), with its deliveries."""

    broker: Broker
    history: History
    deliveries: Deliveries = field(default_factory=Deliveries)

    async def start(self) -> None:
        """Start the broker and wait (bounded) until it is connected."""
        await self.broker.start(
            self.deliveries.on_publication, self.deliveries.on_resubscribed
        )
        assert await self.broker.wait_connected(WAIT), "broker did not connect"

    async def publish(self, room: str, data: Any, origin: str = "c1") -> Publication:
        return await self.broker.publish(room, prefix(room, data), origin)


class LeftRecorder:
    """A presence store's on_user_left callback: records each call and when it came.

    ``settle`` is the barrier that proves a user_left did *not* come (or came only once): it
    makes a sentinel user leave the same room now and waits for the sentinel's user_left. A
    pending decision of the room is announced no later than one scheduled after it with the same
    grace (memory: timers fire in the order they were set; Redis: one node pops the room's due
    leaves in one atomic step and announces them in deadline order without pausing in between,
    whichever node's tick it is), so once the sentinel's has arrived, every user_left of the
    room that was due before it has arrived too.
    """

    SENTINEL = "sentinel"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.times: dict[str, float] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._sentinels = itertools.count(1)

    def _event(self, user_id: str) -> asyncio.Event:
        return self._events.setdefault(user_id, asyncio.Event())

    async def __call__(self, room: str, user_id: str, username: str) -> None:
        self.calls.append((room, user_id, username))
        self.times.setdefault(user_id, time.monotonic())
        self._event(user_id).set()

    async def wait_for(self, user_id: str, timeout: float = WAIT) -> float:
        """Wait for ``user_id``'s first user_left; returns when it came (time.monotonic)."""
        await asyncio.wait_for(self._event(user_id).wait(), timeout)
        return self.times[user_id]

    async def settle(self, store: PresenceStore, room: str = "r") -> None:
        """Return once every user_left decision of ``room`` scheduled before this call has been
        delivered (to whichever recorder its node reports to)."""
        number = next(self._sentinels)
        sentinel = member(f"{self.SENTINEL}{number}", f"{self.SENTINEL}-conn{number}")
        await store.add(room, sentinel)
        await store.remove(room, sentinel)
        await self.wait_for(sentinel.user_id)

    def users_left(self) -> list[tuple[str, str, str]]:
        """Every user_left call but the sentinels'."""
        return [call for call in self.calls if not call[1].startswith(self.SENTINEL)]


async def eventually_equal(
    read: Callable[[], Awaitable[object]], expected: object, timeout: float = WAIT
) -> None:
    """Poll ``read()`` until it returns ``expected``; fail after ``timeout`` seconds, showing
    the last value read. For what a backend reports on its own schedule (a Redis node's
    connection count is published with its lease refresh)."""
    deadline = time.monotonic() + timeout
    while (last := await read()) != expected:
        assert time.monotonic() < deadline, f"after {timeout}s still {last!r} != {expected!r}"
        await asyncio.sleep(0.05)


def member(
    user_id: str, conn_id: str, nick: str | None = None, joined_at: int = 0, node_id: str = "n1"
) -> Member:
    """A connection of ``user_id`` (username: the id in capitals)."""
    return Member(user_id, user_id.upper(), node_id, conn_id, joined_at, nick)


class Backend(abc.ABC):
    """Builds started broker/history pairs and presence stores of one implementation, and
    closes every one of them (presence first, then broker, as a node shuts down)."""

    name: str

    def __init__(self) -> None:
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._pairs = itertools.count(1)

    async def pair(
        self, history_size: int = 3, history_ttl: float = DAY, start: bool = True,
        idle_ttl: float = DAY,
    ) -> Pair:
        """A broker and its history; started (and connected) unless ``start`` is False.
        ``idle_ttl`` is --idle-room-ttl: how long a room only read keeps its epoch."""
        pair = self._new_pair(history_size, history_ttl, idle_ttl)
        self._closers.append(pair.broker.close)
        self._closers.append(pair.history.close)  # Closed first: newest first.
        if start:
            await pair.start()
        return pair

    async def presence(
        self, node_id: str = "n1", recorder: LeftRecorder | None = None, grace: float = GRACE
    ) -> tuple[PresenceStore, LeftRecorder]:
        """A started presence store of node ``node_id`` and the recorder of its user_left calls
        (pass one ``recorder`` to several stores to see the calls of all of them)."""
        store, close = self._new_presence(node_id, grace)
        self._closers.append(close)
        recorder = recorder or LeftRecorder()
        await store.start(recorder)
        return store, recorder

    @abc.abstractmethod
    def _new_pair(self, history_size: int, history_ttl: float, idle_ttl: float) -> Pair: ...

    @abc.abstractmethod
    def _new_presence(
        self, node_id: str, grace: float
    ) -> tuple[PresenceStore, Callable[[], Awaitable[None]]]: ...

    @abc.abstractmethod
    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for history TTLs (memory: the fake clock; Redis: real time)."""

    async def aclose(self) -> None:
        """Close everything built, newest first, each within a bound. Idempotent."""
        while self._closers:
            close = self._closers.pop()
            try:
                async with asyncio.timeout(WAIT):
                    await close()
            except TimeoutError:
                raise AssertionError(
                    f"{close.__qualname__} did not return within {WAIT}s; tasks:\n"
                    + task_stacks()
                ) from None


def task_stacks() -> str:
    """Where every task of the running loop is waiting: for the report of a hang."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=out)
        task.print_stack(file=out)
    return out.getvalue()


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(5000.0)

    def _new_pair(self, history_size: int, history_ttl: float, idle_ttl: float) -> Pair:
        history = MemoryHistory(history_size, history_ttl, clock=self.clock, idle_ttl=idle_ttl)
        return Pair(MemoryBroker(history), history)

    def _new_presence(
        self, node_id: str, grace: float
    ) -> tuple[PresenceStore, Callable[[], Awaitable[None]]]:
        store = MemoryPresence(node_id, grace)
        return store, store.close

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds


class RedisBackend(Backend):
    """Redis versions as ``build`` wires them for a node, under a prefix unique to this backend
    (so every test is isolated on the shared server). ``settings`` go into every Config."""

    name = "redis"

    def __init__(self, url: str, **settings: Any) -> None:
        super().__init__()
        self.url = url
        self.prefix = f"contract-{secrets.token_hex(6)}"
        self._settings = settings

    def config(self, node_id: str, **settings: Any) -> Config:
        return Config(
            redis_url=self.url, redis_prefix=self.prefix, node_id=node_id,
            node_lease_ttl=LEASE, **{**self._settings, **settings},
        )

    def _new_pair(self, history_size: int, history_ttl: float, idle_ttl: float) -> Pair:
        # A node id of its own: this node's (unused) presence store must never be confused
        # with the stores that tests build.
        node_id = f"broker-{next(self._pairs)}"
        backends = build(self.config(node_id, history_size=history_size,
                                     history_ttl=history_ttl, idle_room_ttl=idle_ttl))
        return Pair(backends.broker, backends.history)

    def _new_presence(
        self, node_id: str, grace: float
    ) -> tuple[PresenceStore, Callable[[], Awaitable[None]]]:
        backends = build(self.config(node_id, presence_grace=grace))

        async def close() -> None:
            await backends.presence.close()
            await backends.history.close()
            await backends.broker.close()  # never started: this only releases the clients

        return backends.presence, close

    async def advance(self, seconds: float) -> None:
        # Redis expires keys on its own clock (PEXPIRE): real time has to pass.
        await asyncio.sleep(seconds)

    def leaseless_presence(self, node_id: str) -> PresenceStore:
        """A presence store of node ``node_id`` that is never started: it writes to Redis like
        any node but holds no lease, so the other nodes see its entries as a dead node's (one
        killed and reaped)."""
        store, close = self._new_presence(node_id, GRACE)
        self._closers.append(close)
        return store
