"""Every Redis key and channel name roomcast uses, built in one place under one prefix.

Room-scoped names carry the room in a hash tag (``{room}``) so that every key and the channel of
one room fall in one Redis Cluster slot: the Lua scripts touch only one room's keys, and the
channel can move to sharded pub/sub (SPUBLISH) without renaming anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "roomcast"

    # --- per room ---------------------------------------------------------------------------
    def channel(self, room: str) -> str:
        """Pub/sub channel carrying every publication and event of the room."""
        return f"{self.prefix}:ch:{{{room}}}"

    def meta(self, room: str) -> str:
        """Hash: ``offset`` (last assigned) and ``epoch`` of the room's history."""
        return f"{self.prefix}:meta:{{{room}}}"

    def stream(self, room: str) -> str:
        """Stream of stored message envelopes; entry ID ``<offset>-0``."""
        return f"{self.prefix}:hist:{{{room}}}"

    def presence(self, room: str, node_id: str) -> str:
        """Hash conn_id -> member JSON for one node's connections in the room."""
        return f"{self.prefix}:pres:{{{room}}}:{node_id}"

    def presence_nodes(self, room: str) -> str:
        """Set of node ids that have a presence hash for the room."""
        return f"{self.prefix}:presnodes:{{{room}}}"

    def nicks(self, room: str) -> str:
        """Hash nick -> ``node_id conn_id user_id`` of the connection holding it."""
        return f"{self.prefix}:nicks:{{{room}}}"

    def users(self, room: str) -> str:
        """Hash user_id -> number of live connections of that user in the room."""
        return f"{self.prefix}:users:{{{room}}}"

    def room_of_channel(self, channel: str) -> str:
        """Inverse of channel(): the room of a ``<prefix>:ch:{room}`` channel name."""
        return channel[len(self.prefix) + 5 : -1]

    def control(self) -> str:
        """Node-wide pub/sub channel each node subscribes to first, so that its pub/sub
        connection is in subscribed mode (and its liveness confirmed) even with no rooms."""
        return f"{self.prefix}:control"

    # --- per node / cluster-wide ---------------------------------------------------------------
    def nodes(self) -> str:
        """Sorted set node_id -> lease deadline (unix ms); a past deadline is a dead node."""
        return f"{self.prefix}:nodes"

    def node_info(self, node_id: str) -> str:
        """Hash with the node's connection count and address, refreshed with its lease."""
        return f"{self.prefix}:node:{node_id}"

    def node_rooms(self, node_id: str) -> str:
        """Set of rooms where the node holds presence entries (to drop them all at once)."""
        return f"{self.prefix}:noderooms:{node_id}"

    def rooms(self) -> str:
        """Set of rooms with at least one present user, cluster-wide."""
        return f"{self.prefix}:rooms"

    def leave_names(self) -> str:
        """Hash ``room\\x00user_id`` -> username, beside leaves()."""
        return f"{self.prefix}:leavenames"

    def leaves(self) -> str:
        """Sorted set of pending user_left decisions, member ``room\\x00user_id``,
        score = unix ms after which the user counts as gone."""
        return f"{self.prefix}:leaves"
