"""The broker seam: how a publication reaches every node with members of a room.

A broker stores each message in the room's history (which gives it its offset) and hands every
publication, stored message or ephemeral event, to the node's ``on_publication`` callback for the
rooms the node subscribed. ``MemoryBroker`` (here) serves a lone node; ``RedisBroker``
(broker_redis.py) carries publications between the nodes of a cluster. tests/contract/
test_broker.py runs the same assertions against both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from roomcast import clock
from roomcast.backends.history import MemoryHistory


class BrokerUnavailable(Exception):
    """The backend cannot take the operation now (Redis is down); nothing was done.

    Raised by every seam (broker, history, presence); the service answers 'unavailable'.
    """


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


#: Called for every publication of a subscribed room, on the event loop, in offset order.
OnPublication = Callable[[Publication], None]
#: Called after the broker lost its subscriptions and made them again (a Redis reconnect): the
#: node refills from history whatever was published to these rooms in between.
OnResubscribed = Callable[[Collection[str]], None]


class Broker(Protocol):
    """What the node needs from a fan-out backend."""

    @property
    def available(self) -> bool:
        """False while the backend is unreachable; publishes then raise BrokerUnavailable."""

    async def start(
        self, on_publication: OnPublication, on_resubscribed: OnResubscribed | None = None
    ) -> None:
        """Connect and start delivering publications of subscribed rooms to ``on_publication``."""

    async def wait_connected(self, within: float) -> bool:
        """Wait up to ``within`` seconds for the backend; False if it is not reachable yet."""

    async def close(self) -> None:
        """Stop delivering and release connections. Idempotent."""

    async def subscribe(self, room: str) -> None:
        """Deliver the room's publications from now on; returns once the subscription is live."""

    async def unsubscribe(self, room: str) -> None:
        """Stop delivering the room's publications."""

    async def publish(self, room: str, prefix: bytes, origin: str) -> Publication:
        """Store and publish a message (see protocol.envelopes.message_prefix); returns it with
        its offset. Raises BrokerUnavailable when it could not be stored: never a silent drop."""

    async def publish_event(self, room: str, payload: bytes, origin: str = "") -> None:
        """Publish an ephemeral event to the room's members on every node; not stored."""


class MemoryBroker:
    """Fan-out inside one process: the embedded default. Stores through a MemoryHistory."""

    def __init__(self, history: MemoryHistory) -> None:
        self._history = history
        self._subscribed: set[str] = set()
        self._on_publication: OnPublication | None = None

    @property
    def available(self) -> bool:
        return self._on_publication is not None

    async def start(
        self, on_publication: OnPublication, on_resubscribed: OnResubscribed | None = None
    ) -> None:
        self._on_publication = on_publication

    async def wait_connected(self, within: float) -> bool:
        return self.available

    async def close(self) -> None:
        self._on_publication = None

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)

    def _deliver(self, publication: Publication) -> None:
        if self._on_publication is None:
            raise BrokerUnavailable("broker is closed")
        if publication.room in self._subscribed:
            self._on_publication(publication)

    async def publish(self, room: str, prefix: bytes, origin: str) -> Publication:
        if self._on_publication is None:
            raise BrokerUnavailable("broker is closed")
        offset, epoch, payload = self._history.append(room, prefix)
        publication = Publication(room, payload, offset, epoch, origin, clock.now_us())
        self._deliver(publication)
        return publication

    async def publish_event(self, room: str, payload: bytes, origin: str = "") -> None:
        self._deliver(Publication(room, payload, 0, "", origin, clock.now_us()))
