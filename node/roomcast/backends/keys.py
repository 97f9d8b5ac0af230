"""Every Redis key and channel name roomcast uses, built in one place under one prefix.

Nothing else in roomcast formats a Redis name: the backends call these methods and hand the names
to Lua through KEYS (and, for the one channel a script publishes to, ARGV).

Redis Cluster: room-scoped names carry the room in a hash tag (``{room}``), so that every key and
the channel of one room fall in one slot and a room's Lua script may touch all of them at once;
the channel can move to sharded pub/sub (SPUBLISH) without renaming anything. A user's
connections hash carries the user id as its tag (one key, touched alone). Node-level and
cluster-wide names carry no tag and each is touched only by commands (or one-key scripts) of its
own, never together with a room's keys (tests/unit/test_slots.py computes the slots).

With --redis-cluster (``Keys.partitions`` N > 0) the tag is the room's partition instead,
``{p<n>}`` with n = CRC-32(room) mod N, followed by ``:<room>`` (``meta:{p17}:lobby``); the
channel is the partition's, ``ch:{p17}``, for SPUBLISH/SSUBSCRIBE. The slots column then
reads "the room's partition's".

Client-side sharding (several --redis-url): the names stay as above; a room's ``ch``, ``meta``,
``hist`` and ``idem`` live on the Redis of its shard (``shard``), everything else (presence,
node state, the control channel) on the first.

Expiry (presence_redis.py): every presence key of a room (``pres``, ``presnodes``, ``users``,
``nicks``, ``leaves``, ``leavenames``) and each ``noderooms`` set carry a TTL (--idle-room-ttl,
with a floor) that the nodes with entries there refresh; ``node:<node>`` lives two leases. Only
``nodes`` and ``leaverooms`` have none: each names what another node reaps or announces.
``uconns:{user}`` lives USER_CONNS_TTL (presence_redis.py) past its user's last open or close.
``idem:{room}:<hash>`` lives the publish's idempotency window (lua/publish.lua sets it with PX).

=========================  ==========================================  ==================
name                       what                                        slot
=========================  ==========================================  ==================
``ch:{room}``              pub/sub channel of the room                 the room's
``meta:{room}``            hash: history offset and epoch              the room's
``hist:{room}``            stream of stored messages                   the room's
``pres:{room}:<node>``     hash conn_id -> member JSON, one node       the room's
``presnodes:{room}``       set of nodes with entries in the room       the room's
``users:{room}``           hash user_id -> connection count            the room's
``nicks:{room}``           hash nick -> ``node conn owner``            the room's
``leaves:{room}``          zset user_id -> user_left deadline          the room's
``leavenames:{room}``      hash user_id -> username, beside leaves     the room's
``idem:{room}:<hash>``     string ``offset epoch`` of the publish      the room's
                           made with one idempotency key (sha256 hex)
``uconns:{user}``          hash conn_id -> node_id: the user's open    the user's
                           connections in the cluster
``control``                node-wide pub/sub channel                   (a channel)
``nodes``                  zset node_id -> lease deadline, or a hold   its own
``node:<node>``            hash: the node's connection count           its own
``noderooms:<node>``       set of rooms where the node has entries     its own
``leaverooms``             zset room -> when to look at its leaves     its own
=========================  ==========================================  ==================
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass


def partition(room: str, partitions: int) -> int:
    """The room's partition, 0 .. partitions-1: CRC-32 of its name, the same in every process
    and release (never Python's salted ``hash``), so every node agrees."""
    return zlib.crc32(room.encode()) % partitions


def shard(room: str, shards: int) -> int:
    """The room's shard, 0 .. shards-1, for client-side sharding over several Redis URLs: jump
    consistent hash (Lamping and Veach, 2014) of a 64-bit digest of its name. Adding an N+1-th
    shard moves only about 1/(N+1) of the rooms, each to the new shard."""
    if shards <= 1:
        return 0  # One Redis: nothing to hash (the common case, on every publish).
    key = int.from_bytes(hashlib.blake2b(room.encode(), digest_size=8).digest(), "big")
    b, j = -1, 0
    while j < shards:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "roomcast"
    #: 0: every room is its own hash tag and has a channel of its own (one Redis). N > 0
    #: (--redis-cluster): rooms are spread over N partitions; a room's keys carry its
    #: partition's tag (``{p<n>}``, then the room) and the partition's one sharded channel
    #: carries all its rooms (each frame names its room), so that a node holds one sharded
    #: subscription per partition it needs and the partitions spread evenly over the shards.
    partitions: int = 0

    def _room(self, room: str) -> str:
        """The room's part of a key name: its hash tag, and its name when that is not it."""
        if not self.partitions:
            return f"{{{room}}}"
        return f"{{p{partition(room, self.partitions)}}}:{room}"

    # --- per room: all in the room's slot ------------------------------------------------------
    def channel(self, room: str) -> str:
        """Pub/sub channel carrying every publication and event of the room (with partitions:
        of every room of its partition)."""
        if self.partitions:
            return self.partition_channel(partition(room, self.partitions))
        return f"{self.prefix}:ch:{{{room}}}"

    def partition_channel(self, index: int) -> str:
        """Sharded channel of partition ``index`` (--redis-cluster)."""
        return f"{self.prefix}:ch:{{p{index}}}"

    def meta(self, room: str) -> str:
        """Hash: ``offset`` (last assigned) and ``epoch`` of the room's history."""
        return f"{self.prefix}:meta:{self._room(room)}"

    def stream(self, room: str) -> str:
        """Stream of stored message envelopes; entry ID ``<offset>-0``."""
        return f"{self.prefix}:hist:{self._room(room)}"

    def presence(self, room: str, node_id: str) -> str:
        """Hash conn_id -> member JSON for one node's connections in the room."""
        return f"{self.prefix}:pres:{self._room(room)}:{node_id}"

    def presence_nodes(self, room: str) -> str:
        """Set of node ids that have a presence hash for the room."""
        return f"{self.prefix}:presnodes:{self._room(room)}"

    def nicks(self, room: str) -> str:
        """Hash nick -> ``node_id conn_id owner`` of the connection holding it (the owner,
        which may contain spaces, last)."""
        return f"{self.prefix}:nicks:{self._room(room)}"

    def users(self, room: str) -> str:
        """Hash user_id -> number of live connections of that user in the room."""
        return f"{self.prefix}:users:{self._room(room)}"

    def leaves(self, room: str) -> str:
        """Sorted set of the room's pending user_left decisions: member user_id, score = unix
        ms after which the user counts as gone."""
        return f"{self.prefix}:leaves:{self._room(room)}"

    def leave_names(self, room: str) -> str:
        """Hash user_id -> username of each pending leave in leaves(room)."""
        return f"{self.prefix}:leavenames:{self._room(room)}"

    def idempotency(self, room: str, key: str) -> str:
        """String ``<offset> <epoch>`` of the message first published to the room with the
        client's idempotency ``key`` (lua/publish.lua). The key is hashed (SHA-256, hex): a
        client string of any characters and length becomes a short name after the room's tag,
        so it can never move the name out of the room's slot nor into another concept's."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}:idem:{self._room(room)}:{digest}"

    def room_of_channel(self, channel: str) -> str:
        """Inverse of channel() without partitions: the room of a ``<prefix>:ch:{room}``
        channel name. (A partition's channel has no one room: its frames name theirs.)"""
        return channel[len(self.prefix) + 5 : -1]

    def control(self) -> str:
        """Node-wide pub/sub channel each node subscribes to first, so that its pub/sub
        connection is in subscribed mode (and its liveness confirmed) even with no rooms."""
        return f"{self.prefix}:control"

    # --- per user: one key, in the user's slot, touched alone -----------------------------------
    def user_connections(self, user_id: str) -> str:
        """Hash conn_id -> node_id of the user's open connections in the cluster, for the
        per-user connection limit (lua/open_connection.lua); entries of dead nodes are dropped
        by the user's next open."""
        return f"{self.prefix}:uconns:{{{user_id}}}"

    # --- per node / cluster-wide: each in a slot of its own, never in a room's script ----------
    def nodes(self) -> str:
        """Sorted set node_id -> lease deadline (unix ms); a past deadline is a dead node. A
        negative score is a reaper's hold on a dead node (lua/claim_due.lua)."""
        return f"{self.prefix}:nodes"

    def node_info(self, node_id: str) -> str:
        """Hash with the node's connection count, refreshed with its lease."""
        return f"{self.prefix}:node:{node_id}"

    def node_rooms(self, node_id: str) -> str:
        """Set of rooms where the node holds presence entries, so that a reaper can visit them
        one by one (and stats() can list the rooms in use)."""
        return f"{self.prefix}:noderooms:{node_id}"

    def leave_rooms(self) -> str:
        """Sorted set room -> unix ms when its leaves(room) next needs a look (no later than its
        earliest pending deadline); a negative score is a claimer's hold (lua/claim_due.lua)."""
        return f"{self.prefix}:leaverooms"

    def probe(self, node_id: str) -> str:
        """String the node's health probe writes every second with an expiry (a write that
        Redis refuses when it is out of memory or a read-only replica)."""
        return f"{self.prefix}:probe:{node_id}"
