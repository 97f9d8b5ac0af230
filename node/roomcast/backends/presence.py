"""The presence seam: who is in each room, across the cluster; user_joined/user_left decisions.

Presence is per connection (a user with two tabs has two entries) but events are per user: a user
"joins" a room when their first connection enters it and "leaves" once they have had none for the
grace window, so a reconnect within the window causes no user_left/user_joined flap.
``MemoryPresence`` (here) serves a lone node; ``RedisPresence`` (presence_redis.py) a cluster.

In a cluster the store may have to repair: a node that was paused past its lease is reaped by a
peer (its users announced gone) although its connections are still open. When it comes back it
writes its entries again and reports each user that the cluster no longer counted through
``on_user_back`` (the service announces them with user_joined again); ``restore`` does the same
for one user on demand (the service saw a user_left about a user connected here).

Two counts serve the service's limits: ``open_connection``/``close_connection`` count each user's
open connections across the cluster (a per-user connection limit), and ``count`` gives a room's
distinct users (a per-room member limit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Member:
    """One connection's presence in one room."""

    user_id: str
    username: str
    node_id: str
    conn_id: str
    joined_at: int  # unix milliseconds, like every ts
    nick: str | None = None
    #: A public JSON value from the user's token, shown in presence; None for none.
    info: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The member as listed in presence (and stored as JSON by RedisPresence): a nick or
        info that is None is left out."""
        # Built by hand, not dataclasses.asdict: that deep-copies ``info``, and this runs once
        # per join (a sizeable share of a join storm's presence writes).
        body: dict[str, Any] = {"user_id": self.user_id, "username": self.username,
                                "node_id": self.node_id, "conn_id": self.conn_id,
                                "joined_at": self.joined_at}
        if self.nick is not None:
            body["nick"] = self.nick
        if self.info is not None:
            body["info"] = self.info
        return body


#: Called with (room, user_id, username) once a user has been gone for the grace window.
OnUserLeft = Callable[[str, str, str], Awaitable[None]]
#: Called with (room, user_id, username) for a user connected on this node whom the cluster had
#: stopped counting (this node was reaped, or the store lost its data) once the store counts the
#: user again: announce user_joined again, or some members keep believing the user gone.
OnUserBack = Callable[[str, str, str], Awaitable[None]]


class PresenceStore(Protocol):
    async def start(self, on_user_left: OnUserLeft, on_user_back: OnUserBack | None = None
                    ) -> None:
        """Begin background work (leases, reaping); user_left decisions go to the first
        callback, users written back after the cluster lost them to the second."""

    async def close(self) -> None:
        """Remove this node's entries at once (a clean shutdown) and stop. Idempotent."""

    async def add(self, room: str, member: Member) -> bool:
        """Record the connection; True when its user was not present (send user_joined)."""

    async def remove(self, room: str, member: Member) -> None:
        """Drop the connection; its user leaves after the grace window if no other remains."""

    async def members(self, room: str) -> list[Member]:
        """Every live connection in the room, cluster-wide, oldest first."""

    async def restore(self, room: str, user_id: str) -> None:
        """Write this node's connections of ``user_id`` in ``room`` back wherever the store
        lost them (the cluster announced the user gone while connected here). Idempotent; does
        not call on_user_back."""

    async def claim_nick(self, room: str, nick: str, member: Member, owner: str = "") -> bool:
        """Reserve ``nick`` in the room for this connection; False when another holds it.

        The holder may be replaced by a claimant with the same ``owner`` (a reconnect before the
        old connection is gone): the caller passes ``"user:" + user_id`` for a connection with
        an identity, ``"conn:" + conn_id`` for one without (then nobody else can take the nick
        while it lives). A nick held by a connection of a dead node is free. ``""`` (the
        default) means ``"user:" + member.user_id``."""

    async def open_connection(self, user_id: str, conn_id: str, limit: int) -> bool:
        """Count ``conn_id`` towards ``user_id``'s open connections in the cluster, unless the
        user already has ``limit`` (>= 1) live ones: then False, and nothing is recorded.
        Opening a connection already counted is True. Connections of nodes whose lease lapsed
        (dead, reaped) do not count. Raises BrokerUnavailable when Redis fails."""

    async def close_connection(self, user_id: str, conn_id: str) -> None:
        """Stop counting the connection. Never fails: while Redis is unreachable it is retried
        later, as ``remove`` is."""

    async def count(self, room: str) -> int:
        """Distinct users present in the room, cluster-wide (users within their grace window
        after their last connection left do not count)."""

    async def stats(self) -> dict[str, Any]:
        """``nodes`` {node_id: {connections}} and ``rooms`` {room: distinct users}."""

    def set_connection_count(self, count: int) -> None:
        """This node's open connection count, reported in stats."""


def nick_key(nick: str) -> str:
    """Nicknames compare case-insensitively (lower(), as lua/reap_node.lua does)."""
    return nick.lower()


def nick_owner(member: Member, owner: str) -> str:
    """claim_nick's ``owner``, the default (``""``) filled in from the member."""
    return owner or f"user:{member.user_id}"


def check_limit(limit: int) -> None:
    """open_connection's limit must let at least one connection in."""
    if limit < 1:
        raise ValueError(f"connection limit must be at least 1, not {limit}")


class MemoryPresence:
    """Presence of a lone node."""

    def __init__(self, node_id: str, grace: float) -> None:
        self._node_id = node_id
        self._grace = grace
        self._rooms: dict[str, dict[str, Member]] = {}
        self._nicks: dict[str, dict[str, tuple[str, str]]] = {}  # nick -> (conn_id, owner)
        self._user_conns: dict[str, set[str]] = {}  # user_id -> open conn_ids
        self._leaving: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._on_user_left: OnUserLeft | None = None
        self._connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, on_user_left: OnUserLeft, on_user_back: OnUserBack | None = None
                    ) -> None:
        # A lone node is never reaped and never loses its entries: nothing comes back.
        self._on_user_left = on_user_left

    async def close(self) -> None:
        for timer in self._leaving.values():
            timer.cancel()
        self._leaving.clear()
        self._rooms.clear()
        self._nicks.clear()
        self._user_conns.clear()

    def _present(self, room: str, user_id: str) -> bool:
        return any(m.user_id == user_id for m in self._rooms.get(room, {}).values())

    async def add(self, room: str, member: Member) -> bool:
        returning = self._leaving.pop((room, member.user_id), None)
        if returning is not None:
            returning.cancel()
        was_present = returning is not None or self._present(room, member.user_id)
        self._rooms.setdefault(room, {})[member.conn_id] = member
        return not was_present

    async def remove(self, room: str, member: Member) -> None:
        if member.nick is not None:
            nicks = self._nicks.get(room, {})
            holder = nicks.get(nick_key(member.nick))
            if holder is not None and holder[0] == member.conn_id:
                del nicks[nick_key(member.nick)]
                if not nicks:
                    self._nicks.pop(room, None)
        entries = self._rooms.get(room, {})
        if entries.pop(member.conn_id, None) is None:
            return
        if not entries:
            self._rooms.pop(room, None)
        if self._present(room, member.user_id) or (room, member.user_id) in self._leaving:
            return
        loop = asyncio.get_running_loop()
        self._leaving[(room, member.user_id)] = loop.call_later(
            self._grace, self._left, room, member.user_id, member.username
        )

    def _left(self, room: str, user_id: str, username: str) -> None:
        self._leaving.pop((room, user_id), None)
        if self._present(room, user_id) or self._on_user_left is None:
            return
        task = asyncio.ensure_future(self._on_user_left(room, user_id, username))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def members(self, room: str) -> list[Member]:
        return sorted(self._rooms.get(room, {}).values(), key=lambda m: m.joined_at)

    async def restore(self, room: str, user_id: str) -> None:
        """Nothing to do: memory never loses a connected user's entries."""

    async def claim_nick(self, room: str, nick: str, member: Member, owner: str = "") -> bool:
        owner = nick_owner(member, owner)
        holder = self._nicks.get(room, {}).get(nick_key(nick))
        # The same owner may take its nick over: a reconnect before the old connection is gone.
        if holder is not None and holder[1] != owner:
            return False
        self._nicks.setdefault(room, {})[nick_key(nick)] = (member.conn_id, owner)
        return True

    async def open_connection(self, user_id: str, conn_id: str, limit: int) -> bool:
        check_limit(limit)
        conns = self._user_conns.get(user_id, set())
        if conn_id not in conns and len(conns) >= limit:
            return False
        self._user_conns.setdefault(user_id, conns).add(conn_id)
        return True

    async def close_connection(self, user_id: str, conn_id: str) -> None:
        conns = self._user_conns.get(user_id)
        if conns is None:
            return
        conns.discard(conn_id)
        if not conns:
            del self._user_conns[user_id]

    async def count(self, room: str) -> int:
        return len({m.user_id for m in self._rooms.get(room, {}).values()})

    async def stats(self) -> dict[str, Any]:
        return {
            "nodes": {self._node_id: {"connections": self._connections, "alive": True}},
            "rooms": {
                room: len({m.user_id for m in entries.values()})
                for room, entries in sorted(self._rooms.items())
            },
        }

    def set_connection_count(self, count: int) -> None:
        self._connections = count

