"""RedisPresence: cluster-wide presence in Redis hashes, with node leases.

Layout (names and slots in keys.py): per (room, node) a hash conn_id -> member JSON, so that a
whole node's entries in a room drop at once (lua/reap_node.lua); per room a users hash counting
each user's connections, so that user_joined/user_left are per user, a nicks hash, and the
room's pending user_left decisions (a zset user_id -> deadline and a hash of usernames).
Node-level: a zset of node leases, each node's info hash and the set of rooms where it has
entries. Cluster-wide: an index of the rooms that may have pending leaves. Every node, once a
second, refreshes its lease, reaps nodes whose lease ran out and announces due user_left
decisions. A node killed with -9 vanishes from queries as soon as its lease expires
(node_lease_ttl, default 5 s), because queries read only live nodes' hashes.

Redis Cluster: every Lua script touches only the keys it is given, all in one slot: a room's
scripts only that room's ``{room}`` keys, the others (lua/claim_due.lua, lua/leave_index.lua)
one node-level key. So what one script used to do atomically across a room and the node-level
keys is now several calls, and the order of those calls is what keeps the data right when nodes
race or die between them (the comments at each call say why):

* A node's rooms set may name a room where the node has no entry, never the reverse: a room is
  added before the entry is written and removed after the last one is gone. Whoever reaps the
  node therefore visits every room it has entries in.
* The leave-rooms index never misses a room with a pending leave: a leave is written in the
  room first and indexed after; the ticker claims a room with a hold (not by removing it) and,
  once it has taken the due leaves, settles the index so that a leave scheduled meanwhile keeps
  its entry (lua/leave_index.lua). A claimer or reaper that dies only leaves a hold behind,
  which another node takes over when it runs out (lua/claim_due.lua).
* A reap ends by deleting the node's lease, after its last room: a node that was judged dead
  but was only paused, and wrote its entries again while being reaped, finds its lease gone on
  its next refresh and writes them once more, after the reap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from roomcast import clock
from roomcast.backends.keys import Keys
from roomcast.backends.presence import Member, OnUserLeft, nick_key
from roomcast.backends.redis_common import as_str, load_script, unavailable_on_redis_error

log = structlog.get_logger("roomcast.presence")

#: Seconds between lease refreshes, reaps and user_left claims. A constant, not a setting: the
#: lease (--node-lease-ttl, default 5 s) must span several ticks, and user_left is announced at
#: most one tick after the grace window.
TICK = 1.0

#: Rooms looked at, and due leaves taken per room, in one tick; the rest wait for the next.
BATCH = 100

#: Tries of claim_nick's read-then-swap when the holder keeps changing under it; then the nick
#: counts as taken (others are fighting over it).
NICK_ATTEMPTS = 3

SCRIPTS = ("presence_add", "presence_remove", "reap_node", "leaves_due", "claim_nick",
           "claim_due", "leave_index")


class _RoomLocks:
    """One asyncio lock per room, dropped again when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, room: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(room, (asyncio.Lock(), 0))
        self._locks[room] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[room]
            if users == 1:
                del self._locks[room]
            else:
                self._locks[room] = (lock, users - 1)


class RedisPresence:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, node_id: str, grace: float, lease_ttl: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._node_id = node_id
        self._grace_ms = int(grace * 1000)
        self._lease_ms = int(lease_ttl * 1000)
        self._scripts = {name: redis.register_script(load_script(name)) for name in SCRIPTS}
        self._connections = 0
        #: This node's entries, so they can be written again if Redis loses them.
        self._local: dict[tuple[str, str], Member] = {}
        #: Set when our lease was found gone (or held by a reaper); cleared once every entry in
        #: _local has been written again, so a re-registration cut short is finished later.
        self._must_reregister = False
        #: Removals that failed while Redis was unreachable, retried by the ticker.
        self._pending_removals: list[tuple[str, Member, int]] = []
        #: Serializes this node's writes per room: the room's entries and this node's rooms set
        #: change in separate calls, which must not interleave with another add/remove here.
        self._room_locks = _RoomLocks()
        self._on_user_left: OnUserLeft | None = None
        self._last_refresh = clock.monotonic()
        self._reap_after = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Set by close(): the ticker stops at its next turn even if a cancellation was lost (a
        #: redis-py pipeline can swallow one that arrives just as its reply does).
        self._stop = asyncio.Event()

    async def start(self, on_user_left: OnUserLeft) -> None:
        self._on_user_left = on_user_left
        with contextlib.suppress(RedisError, OSError):
            await self._refresh_lease()
        self._task = asyncio.create_task(self._tick_forever(), name="presence-ticker")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A clean shutdown removes this node's entries at once; user_left waits for the grace
        # window (announced by a surviving node), so users who reconnect elsewhere do not flap.
        try:
            await self._reap(self._node_id, clock.now_ms() + self._grace_ms, force=True)
        except (RedisError, OSError):
            log.warning("could not remove presence entries on shutdown", exc_info=True)

    # --- background work ---------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while not self._closed:
            try:
                await self._retry_removals()
                await self._refresh_lease()
                now = clock.monotonic()
                if now - self._last_refresh > self._lease_ms / 1000:
                    # We could not refresh for a whole lease: Redis (or this process) stalled,
                    # so every peer's lease may have lapsed too. Give them one lease to renew
                    # before judging anyone dead, or live users would get a false user_left.
                    self._reap_after = now + self._lease_ms / 1000
                self._last_refresh = now
                if now >= self._reap_after:
                    await self._reap_dead()
                await self._announce_due_leaves()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.debug("presence tick failed", error=str(exc))
            except Exception:
                log.error("presence tick crashed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), TICK)

    async def _retry_removals(self) -> None:
        while self._pending_removals:
            room, member, deadline = self._pending_removals[0]
            await self._remove(room, member, deadline)
            self._pending_removals.pop(0)

    async def _refresh_lease(self) -> None:
        k = self._keys
        # Read the old score and renew in one transaction (one key, one slot), so that no reap
        # can slip between the check and the renewal unnoticed.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zscore(k.nodes(), self._node_id)
            pipe.zadd(k.nodes(), {self._node_id: clock.now_ms() + self._lease_ms})
            previous, _ = await pipe.execute()
        if previous is None or float(previous) < 0:
            # No lease (Redis lost its data, or a reaper finished with us after a long pause)
            # or a reaper's hold on us (it is dropping our entries right now). The lease is
            # renewed before the entries are written back: a reaper still at work deletes the
            # lease when it is done, and then we write them again on the next tick.
            self._must_reregister = True
        if self._must_reregister:
            if self._local:
                log.warning("re-registering presence", entries=len(self._local))
            for (room, conn_id), member in list(self._local.items()):
                async with self._room_locks.hold(room):
                    if self._local.get((room, conn_id)) is member:  # Not removed meanwhile.
                        await self._write_entry(room, member)
            self._must_reregister = False
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(k.node_info(self._node_id), mapping={"connections": self._connections})
            pipe.pexpire(k.node_info(self._node_id), self._lease_ms * 2)
            await pipe.execute()

    async def _reap_dead(self) -> None:
        now = clock.now_ms()
        # Lapsed leases, and holds of reapers that may have died (claim_due.lua decides).
        dead = await self._redis.zrangebyscore(self._keys.nodes(), "-inf", now - 1)
        for raw in dead:
            node_id = as_str(raw)
            if node_id == self._node_id:
                continue  # Our own lease lapsed (a long pause): refresh re-registers us.
            dropped = await self._reap(node_id, clock.now_ms())
            if dropped >= 0:
                log.info("reaped dead node", dead_node=node_id, connections=dropped)

    async def _reap(self, node_id: str, deadline_ms: int, force: bool = False) -> int:
        """Drop every entry of ``node_id``, one room at a time; its users leave at
        ``deadline_ms``. Returns the number of connections dropped, or -1 when the node is
        not (or no longer) due, or another node holds the reap."""
        k = self._keys
        now = clock.now_ms()
        # The hold lasts one lease: a reaper silent for that long counts as dead too, and the
        # next node takes the reap over (every step below may run twice without harm).
        hold = -(now + self._lease_ms)
        if force:
            await self._redis.zadd(k.nodes(), {node_id: hold})  # Our own clean shutdown.
        elif not await self._scripts["claim_due"](
            keys=[k.nodes()], args=[node_id, now - 1, now, hold]
        ):
            return -1
        dropped = 0
        for raw in await self._redis.smembers(k.node_rooms(node_id)):
            room = as_str(raw)
            count, earliest = await self._scripts["reap_node"](
                keys=self._room_keys(room, node_id), args=[node_id, deadline_ms],
            )
            dropped += int(count)
            await self._index_leaves(room, as_str(earliest))
        # Node-level keys last, each in a command of its own (different slots), the lease at
        # the very end: until then the node stays claimed, so a reap cut short is resumed.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(k.node_rooms(node_id))
            pipe.delete(k.node_info(node_id))
            pipe.zrem(k.nodes(), node_id)
            await pipe.execute()
        return dropped

    async def _announce_due_leaves(self) -> None:
        k = self._keys
        now = clock.now_ms()
        # Earliest first (holds, being negative, come before everything), so that a leave due
        # earlier is announced no later than one due after it.
        rooms = await self._redis.zrangebyscore(k.leave_rooms(), "-inf", now, start=0, num=BATCH)
        for raw in rooms:
            room = as_str(raw)
            now = clock.now_ms()
            # Claimed with a hold rather than removed from the index: if this node dies before
            # it settles the room, the room stays indexed and another node looks once the hold
            # runs out. Two nodes at once would be harmless too: leaves_due.lua pops each leave
            # atomically, so each is announced once.
            hold = -(now + self._lease_ms)
            if not await self._scripts["claim_due"](
                keys=[k.leave_rooms()], args=[room, now, now, hold]
            ):
                continue
            reply = await self._scripts["leaves_due"](
                keys=[k.leaves(room), k.leave_names(room), k.users(room)], args=[now, BATCH],
            )
            # Settle before announcing, so that a slow announcement holds nothing up. A leave
            # scheduled after leaves_due.lua looked was indexed by its remover after that, which
            # replaced our hold: leave_index.lua then keeps the remover's score (and ours, if
            # earlier) instead of dropping the room.
            await self._scripts["leave_index"](
                keys=[k.leave_rooms()], args=[room, as_str(reply[0]), hold],
            )
            for i in range(1, len(reply), 2):
                user_id, username = as_str(reply[i]), as_str(reply[i + 1])
                if self._on_user_left is not None and not self._closed:
                    await self._on_user_left(room, user_id, username)

    async def _index_leaves(self, room: str, earliest: str) -> None:
        """Index the room's pending leaves (earliest deadline ``earliest``, '' for none) in the
        leave-rooms index. Called after the room's script wrote them, never before: a claimer
        that looked at the room in between then still finds the room indexed afterwards."""
        if earliest:
            await self._scripts["leave_index"](
                keys=[self._keys.leave_rooms()], args=[room, earliest, ""],
            )

    # --- the PresenceStore contract --------------------------------------------------------------

    def _room_keys(self, room: str, node_id: str) -> list[str]:
        """KEYS of presence_remove.lua and reap_node.lua: all in the room's slot."""
        k = self._keys
        return [k.presence(room, node_id), k.presence_nodes(room), k.users(room), k.nicks(room),
                k.leaves(room), k.leave_names(room)]

    @unavailable_on_redis_error
    async def add(self, room: str, member: Member) -> bool:
        async with self._room_locks.hold(room):
            fresh = await self._write_entry(room, member)
            self._local[(room, member.conn_id)] = member
        return fresh

    async def _write_entry(self, room: str, member: Member) -> bool:
        """Write one of this node's entries; True when its user was not present. Under the
        room's lock."""
        k = self._keys
        # The room joins this node's rooms set before the entry exists, so that whoever reaps
        # this node finds it (if we die right here, a reaper visits a room with nothing of ours:
        # harmless).
        await self._redis.sadd(k.node_rooms(self._node_id), room)
        fresh = await self._scripts["presence_add"](
            keys=[k.presence(room, self._node_id), k.presence_nodes(room), k.users(room),
                  k.leaves(room), k.leave_names(room)],
            args=[self._node_id, member.conn_id, orjson.dumps(member.to_dict()),
                  member.user_id],
        )
        return bool(fresh)

    async def remove(self, room: str, member: Member) -> None:
        """Never fails: while Redis is unreachable the removal is queued and retried."""
        deadline = clock.now_ms() + self._grace_ms
        try:
            await self._remove(room, member, deadline)
        except (RedisError, OSError):
            self._pending_removals.append((room, member, deadline))

    async def _remove(self, room: str, member: Member, deadline_ms: int) -> None:
        async with self._room_locks.hold(room):
            # Forgotten under the lock, so that a re-registration cannot write it back after
            # this removal.
            self._local.pop((room, member.conn_id), None)
            _, empty, earliest = await self._scripts["presence_remove"](
                keys=self._room_keys(room, self._node_id),
                args=[self._node_id, member.conn_id, member.user_id, member.username,
                      deadline_ms, nick_key(member.nick) if member.nick else ""],
            )
            # The leave exists in the room now; index it. If this fails, the retried removal
            # finds the connection gone but still returns the pending leave to index.
            await self._index_leaves(room, as_str(earliest))
            if int(empty):
                # Last: until the room is out of this node's rooms set, a reaper of this node
                # would still visit it (and index its leaves, should we die before the line
                # above). The room lock keeps an add here from slipping in between.
                await self._redis.srem(self._keys.node_rooms(self._node_id), room)

    async def _alive_nodes(self) -> set[str]:
        alive = await self._redis.zrangebyscore(self._keys.nodes(), clock.now_ms(), "+inf")
        return {as_str(raw) for raw in alive}

    async def _lease_alive(self, node_id: str) -> bool:
        lease = await self._redis.zscore(self._keys.nodes(), node_id)
        # None: gone or reaped; negative: a reaper's hold; past: lapsed. All count as dead.
        return lease is not None and float(lease) >= clock.now_ms()

    @unavailable_on_redis_error
    async def members(self, room: str) -> list[Member]:
        k = self._keys
        nodes = {as_str(raw) for raw in await self._redis.smembers(k.presence_nodes(room))}
        nodes &= await self._alive_nodes()
        if not nodes:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for node_id in sorted(nodes):
                pipe.hvals(k.presence(room, node_id))
            replies = await pipe.execute()
        members = [Member(**orjson.loads(raw)) for reply in replies for raw in reply]
        members.sort(key=lambda m: m.joined_at)
        return members

    @unavailable_on_redis_error
    async def claim_nick(self, room: str, nick: str, member: Member) -> bool:
        key = nick_key(nick)
        claimant = f"{self._node_id} {member.conn_id} {member.user_id}"
        for _ in range(NICK_ATTEMPTS):
            raw = await self._redis.hget(self._keys.nicks(room), key)
            holder = "" if raw is None else as_str(raw)
            if holder and holder != claimant:
                holder_node, _, holder_user = holder.split(" ", 2)
                # The same user may take its nick over (a reconnect before the old connection
                # is gone); another user's only from a dead node. The lease is read in a call
                # of its own (another slot); the swap below fails if the holder changed since.
                if holder_user != member.user_id and await self._lease_alive(holder_node):
                    return False
            if await self._scripts["claim_nick"](
                keys=[self._keys.nicks(room)], args=[key, claimant, holder]
            ):
                return True
        return False

    @unavailable_on_redis_error
    async def stats(self) -> dict[str, Any]:
        k = self._keys
        now = clock.now_ms()
        leases: Any = await self._redis.zrange(k.nodes(), 0, -1, withscores=True)
        registered = [(as_str(raw), float(score)) for raw, score in leases]
        alive = sorted(node_id for node_id, score in registered if score >= now)
        # The rooms in use are those in some node's rooms set; dead nodes not yet reaped are
        # read too, as their users still count until the reap (as they always did). One command
        # per key, in a pipeline that is not a transaction: the keys are in different slots.
        async with self._redis.pipeline(transaction=False) as pipe:
            for node_id in alive:
                pipe.hget(k.node_info(node_id), "connections")
            for node_id, _ in registered:
                pipe.smembers(k.node_rooms(node_id))
            replies = await pipe.execute()
        nodes = {
            node_id: {"connections": int(replies[i] or 0), "alive": True}
            for i, node_id in enumerate(alive)
        }
        rooms = sorted({as_str(raw) for reply in replies[len(alive):] for raw in reply})
        async with self._redis.pipeline(transaction=False) as pipe:
            for room in rooms:
                pipe.hlen(k.users(room))
            counts = await pipe.execute()
        return {"nodes": nodes, "rooms": {r: int(c) for r, c in zip(rooms, counts, strict=True)
                                          if c}}

    def set_connection_count(self, count: int) -> None:
        self._connections = count
