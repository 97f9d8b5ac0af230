"""What the service knows of a client: an identity, and a connection it can push bytes to.

The service never sees a socket. A transport (transports/websocket.py) implements
``Connection`` for each client, and ``Fanout`` for writing one publication to many connections
at once; the service calls nothing else on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from roomcast.service.auth import Grant, RoomClaims


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection speaks as: the ``from`` of its messages and its presence entries.

    With ``--auth jwt`` it comes from a verified token and nothing else; with ``--auth none``
    from what the client named (``authenticated`` is then True too: there is nothing to check).
    """

    user_id: str
    username: str
    #: False only for an anonymous connection (--allow-anonymous): join rule "anyone" only.
    authenticated: bool = True
    #: The token's public ``info`` claim, shown in presence and user_joined (None: none).
    info: Any = None
    #: What the token's ``rooms`` claim grants.
    grants: tuple[Grant, ...] = ()
    #: When the token expires, unix seconds (None: no token).
    expires_at: float | None = None
    #: True when another connection of the same user may take over this one's nicks (a
    #: reconnect); False for a connection that has no identity of its own (the tutorial
    #: dialect with --auth none), whose nick is held for as long as it lives.
    reclaims: bool = True

    def nick_owner(self, conn_id: str) -> str:
        """Who may take over a nick this connection holds: its user, or only itself."""
        return f"user:{self.user_id}" if self.reclaims else f"conn:{conn_id}"


class Connection(Protocol):
    """One client connection, as the service sees it."""

    #: Unique per connection (presence entries, the origin of events it publishes).
    conn_id: str
    identity: Identity
    #: The encoding its fan-out needs: "native", or a compatibility dialect's name.
    codec: str
    #: Rooms it is in -> the nick it holds there (None when it asked for none).
    rooms: dict[str, str | None]
    #: Rooms a room token granted it -> that token's claims (actions, until its exp).
    room_grants: dict[str, RoomClaims]

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
        objects, as it joined them to rooms (typed Any: each transport knows its own).

        ``connections`` may be a room's member group itself (a dict that Rooms keeps): the
        transport may then queue the payload once for the whole group and hand it to the
        members later, in order, and before anything else is written to them, as long as a
        member gets exactly what was sent while it was in the group (Rooms calls ``joined``
        before adding a member and ``leaving`` before removing one); it may return 0 then."""

    def joined(self, group: dict[Any, None], conn: Any) -> None:
        """``conn`` is about to be added to ``group``: nothing queued so far is for it."""

    def leaving(self, group: dict[Any, None], conn: Any) -> None:
        """``conn`` is about to leave ``group``: what is queued for it must reach it."""
