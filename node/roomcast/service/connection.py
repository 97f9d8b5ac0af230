"""What the service knows of a client: an identity, and a connection it can push bytes to.

The service never sees a socket. A transport (transports/websocket.py) implements
``Connection`` for each client, and ``Fanout`` for writing one publication to many connections
at once; the service calls nothing else on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection speaks as: the ``from`` of its messages and its presence entries."""

    user_id: str
    username: str


class Connection(Protocol):
    """One client connection, as the service sees it."""

    #: Unique per connection (presence entries, the origin of events it publishes).
    conn_id: str
    identity: Identity
    #: The encoding its fan-out needs: "native", or a compatibility dialect's name.
    codec: str
    #: Rooms it is in -> the nick it holds there (None when it asked for none).
    rooms: dict[str, str | None]

    def send(self, payload: bytes) -> None:
        """Queue one envelope to the client, after everything queued before it. Never blocks;
        a client that cannot keep up is cut off by the transport, not waited for."""

    def close(self, code: int, reason: str) -> None:
        """Start closing the connection with ``code`` (closecodes.py); returns at once."""


class Fanout(Protocol):
    """The transport's bulk write: one payload to many connections, built once."""

    def send(self, connections: Iterable[Any], payload: bytes, skip: str = "") -> int:
        """Queue ``payload`` to each connection except the one whose conn_id is ``skip``;
        returns how many it reached. ``connections`` are the transport's own Connection
        objects, as it joined them to rooms (typed Any: each transport knows its own)."""
