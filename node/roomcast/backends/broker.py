"""The broker seam: how a publication reaches every node with members of a room.

A broker stores each message in the room's history (which gives it its offset) and hands every
publication, stored message or ephemeral event, to the node's ``on_publication`` callback for the
rooms the node subscribed. A publish may carry an idempotency key: a retry with the same key
within its window publishes nothing and returns the first result (``Publication.duplicate``).
A control payload (``publish_control``) goes to every node of the cluster, the sender included,
through ``on_control``. ``MemoryBroker`` (here) serves a lone node; ``RedisBroker``
(broker_redis.py) carries publications between the nodes of a cluster. tests/contract/
test_broker.py runs the same assertions against both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import NamedTuple, Protocol

from roomcast import clock
from roomcast.backends.history import SWEEP_INTERVAL, MemoryHistory
from roomcast.clock import Clock, monotonic


class BrokerUnavailable(Exception):
    """The backend cannot take the operation now (Redis is down); nothing was done.

    Raised by every seam (broker, history, presence); the service answers 'unavailable'.
    """


class Publication(NamedTuple):
    """One publication as delivered to a node (immutable; a named tuple, not a frozen
    dataclass: one is built per message on every node it reaches, and the tuple is built in a
    quarter of the time).

    ``payload`` holds the exact bytes every native member receives. ``offset`` is 0 for ephemeral
    events (typing, presence), which are not stored. ``origin`` is the sender's conn_id, so that
    "to the others" events can skip it. ``ts_us`` is the publish time (unix microseconds).

    ``duplicate`` is True only on what ``publish`` returns for a retry of an idempotent publish:
    the message was published before (``offset`` and ``epoch`` are the first publish's) and
    nothing was published or stored now. Its ``payload`` is then ``b""`` (the stored bytes may
    be trimmed or expired by now; the retrier only needs the position), its ``origin`` is the
    retrier's and its ``ts_us`` 0. A delivered publication is never a duplicate.
    """

    room: str
    payload: bytes
    offset: int = 0
    epoch: str = ""
    origin: str = ""
    ts_us: int = 0
    duplicate: bool = False


#: Called for every publication of a subscribed room, on the event loop, in offset order.
OnPublication = Callable[[Publication], None]
#: Called after the broker lost its subscriptions and made them again (a Redis reconnect): the
#: node refills from history whatever was published to these rooms in between.
OnResubscribed = Callable[[Collection[str]], None]
#: Called on the event loop with each payload any node sent with publish_control.
OnControl = Callable[[bytes], None]

#: Default seconds during which a publish's idempotency key makes a retry a duplicate.
IDEMPOTENCY_WINDOW = 300.0


class Broker(Protocol):
    """What the node needs from a fan-out backend."""

    @property
    def available(self) -> bool:
        """False while the backend is unreachable; publishes then raise BrokerUnavailable."""

    async def start(
        self, on_publication: OnPublication, on_resubscribed: OnResubscribed | None = None,
        on_control: OnControl | None = None,
    ) -> None:
        """Connect and start delivering publications of subscribed rooms to ``on_publication``
        and every node's control payloads to ``on_control``."""

    async def wait_connected(self, within: float) -> bool:
        """Wait up to ``within`` seconds for the backend; False if it is not reachable yet."""

    async def close(self) -> None:
        """Stop delivering and release connections. Idempotent."""

    async def subscribe(self, room: str) -> None:
        """Deliver the room's publications from now on; returns once the subscription is live."""

    async def unsubscribe(self, room: str) -> None:
        """Stop delivering the room's publications."""

    async def publish(
        self, room: str, prefix: bytes, origin: str, idempotency_key: str | None = None,
        window: float = IDEMPOTENCY_WINDOW,
    ) -> Publication:
        """Store and publish a message (see protocol.envelopes.message_prefix); returns it with
        its offset. Raises BrokerUnavailable when it could not be stored: never a silent drop.

        With an ``idempotency_key`` (a client string, at most 128 characters: the caller
        validates it), a publish to the same room with the same key less than ``window``
        seconds (> 0, else ValueError) after the first one that succeeded publishes and stores
        nothing and returns the first one's offset and epoch with ``duplicate=True`` (see
        Publication), even if the room's epoch changed since. The check and the publish are
        one atomic step: of concurrent publishes with one key, exactly one is published."""

    async def publish_event(self, room: str, payload: bytes, origin: str = "") -> None:
        """Publish an ephemeral event to the room's members on every node; not stored."""

    async def publish_control(self, payload: bytes) -> None:
        """Send ``payload`` to the ``on_control`` of every started node of the cluster, this one
        included, once each. Never re-entrant: this node's callback runs later on the event
        loop, not inside this call (it may run before or after this call's caller resumes).
        Not stored: a node that is disconnected at that moment misses it. Raises
        BrokerUnavailable when the backend is unreachable (and before start, after close)."""


def idempotency_window_ms(window: float) -> int:
    """The idempotency window in whole milliseconds (at least 1); ValueError unless > 0."""
    if not window > 0:
        raise ValueError(f"idempotency window must be > 0 seconds, not {window!r}")
    return max(1, round(window * 1000))


class MemoryBroker:
    """Fan-out inside one process: the embedded default. Stores through a MemoryHistory.

    Idempotency keys are held per (room, key) until their window ends, on ``clock`` (monotonic
    seconds; injectable for tests): an expired entry is replaced when its key comes again, and
    every SWEEP_INTERVAL the publish that comes along sweeps all expired entries out, so the
    table holds at most the keys of the last window plus one sweep interval.
    """

    def __init__(self, history: MemoryHistory, clock: Clock = monotonic) -> None:
        self._history = history
        self._clock = clock
        self._subscribed: set[str] = set()
        self._on_publication: OnPublication | None = None
        self._on_control: OnControl | None = None
        #: (room, idempotency key) -> (offset, epoch, monotonic expiry) of its first publish.
        self._seen: dict[tuple[str, str], tuple[int, str, float]] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL

    @property
    def available(self) -> bool:
        return self._on_publication is not None

    def idempotency_keys_held(self) -> int:
        """Idempotency keys held (expired ones until they come again or the next sweep). Not
        ``__len__``: an empty broker must not be falsy."""
        return len(self._seen)

    async def start(
        self, on_publication: OnPublication, on_resubscribed: OnResubscribed | None = None,
        on_control: OnControl | None = None,
    ) -> None:
        self._on_publication = on_publication
        self._on_control = on_control

    async def wait_connected(self, within: float) -> bool:
        return self.available

    async def close(self) -> None:
        self._on_publication = None
        self._on_control = None

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)

    def _deliver(self, publication: Publication) -> None:
        if self._on_publication is None:
            raise BrokerUnavailable("broker is closed")
        if publication.room in self._subscribed:
            self._on_publication(publication)

    async def publish(
        self, room: str, prefix: bytes, origin: str, idempotency_key: str | None = None,
        window: float = IDEMPOTENCY_WINDOW,
    ) -> Publication:
        if self._on_publication is None:
            raise BrokerUnavailable("broker is closed")
        # No await from the check to the record: one step on the event loop, as publish.lua.
        expires_at = 0.0
        if idempotency_key is not None:
            now = self._clock()
            expires_at = now + idempotency_window_ms(window) / 1000
            if now >= self._next_sweep:
                self._sweep(now)
            seen = self._seen.get((room, idempotency_key))
            if seen is not None and now < seen[2]:
                # As stored, even if the room's epoch changed since: see lua/publish.lua.
                return Publication(room, b"", seen[0], seen[1], origin, 0, duplicate=True)
        offset, epoch, payload = self._history.append(room, prefix)
        if idempotency_key is not None:
            self._seen[(room, idempotency_key)] = (offset, epoch, expires_at)
        publication = Publication(room, payload, offset, epoch, origin, clock.now_us())
        self._deliver(publication)
        return publication

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL
        expired = [key for key, (_, _, expires_at) in self._seen.items() if now >= expires_at]
        for key in expired:
            del self._seen[key]

    async def publish_event(self, room: str, payload: bytes, origin: str = "") -> None:
        self._deliver(Publication(room, payload, 0, "", origin, clock.now_us()))

    async def publish_control(self, payload: bytes) -> None:
        if self._on_publication is None:
            raise BrokerUnavailable("broker is closed")
        # On the next turn of the loop, as a Redis round trip would deliver it: the sender's
        # own callback never runs inside this call.
        asyncio.get_running_loop().call_soon(self._control, payload)

    def _control(self, payload: bytes) -> None:
        if self._on_control is not None:  # Closed in between: delivered nowhere, as in Redis.
            self._on_control(payload)
