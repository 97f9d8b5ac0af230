"""RedisPresence: cluster-wide presence in Redis hashes, with node leases.

Layout (names in keys.py): per (room, node) a hash conn_id -> member JSON, so that a whole node's
entries drop at once (lua/reap_node.lua); per room a users hash counting each user's connections,
so that user_joined/user_left are per user; a zset of node leases. Every node, once a second,
refreshes its lease, reaps nodes whose lease ran out and claims due user_left decisions. A node
killed with -9 vanishes from queries as soon as its lease expires (node_lease_ttl, default 5 s),
because queries read only live nodes' hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
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


class RedisPresence:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, node_id: str, grace: float, lease_ttl: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._node_id = node_id
        self._grace_ms = int(grace * 1000)
        self._lease_ms = int(lease_ttl * 1000)
        self._scripts = {
            name: redis.register_script(load_script(name))
            for name in ("presence_add", "presence_remove", "reap_node", "leaves_due",
                         "claim_nick")
        }
        self._connections = 0
        #: This node's entries, so they can be written again if Redis loses them.
        self._local: dict[tuple[str, str], Member] = {}
        #: Removals that failed while Redis was unreachable, retried by the ticker.
        self._pending_removals: list[tuple[str, Member, int]] = []
        self._on_user_left: OnUserLeft | None = None
        self._last_refresh = clock.monotonic()
        self._reap_after = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self, on_user_left: OnUserLeft) -> None:
        self._on_user_left = on_user_left
        with contextlib.suppress(RedisError, OSError):
            await self._refresh_lease()
        self._task = asyncio.create_task(self._tick_forever(), name="presence-ticker")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
        while True:
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
            await asyncio.sleep(TICK)

    async def _retry_removals(self) -> None:
        while self._pending_removals:
            room, member, deadline = self._pending_removals[0]
            await self._remove(room, member, deadline)
            self._pending_removals.pop(0)

    async def _refresh_lease(self) -> None:
        k = self._keys
        if await self._redis.zscore(k.nodes(), self._node_id) is None and self._local:
            # Our lease is gone while we hold entries: Redis lost its data (restart, flush,
            # failover) or another node reaped us after a long pause. Write them back.
            log.warning("re-registering presence", entries=len(self._local))
            for (room, _), member in list(self._local.items()):
                await self._add(room, member)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(k.nodes(), {self._node_id: clock.now_ms() + self._lease_ms})
            pipe.hset(k.node_info(self._node_id), mapping={"connections": self._connections})
            pipe.pexpire(k.node_info(self._node_id), self._lease_ms * 2)
            await pipe.execute()

    async def _reap_dead(self) -> None:
        dead = await self._redis.zrangebyscore(self._keys.nodes(), "-inf", clock.now_ms() - 1)
        for raw in dead:
            node_id = as_str(raw)
            if node_id == self._node_id:
                continue  # Our own lease lapsed (a long pause): refresh re-registers us.
            dropped = await self._reap(node_id, clock.now_ms())
            if dropped >= 0:
                log.info("reaped dead node", dead_node=node_id, connections=dropped)

    async def _reap(self, node_id: str, deadline_ms: int, force: bool = False) -> int:
        k = self._keys
        result = await self._scripts["reap_node"](
            keys=[k.nodes(), k.node_rooms(node_id), k.leaves(), k.leave_names(), k.rooms(),
                  k.node_info(node_id)],
            args=[node_id, k.prefix, deadline_ms, "1" if force else "0"],
        )
        return int(result)

    async def _announce_due_leaves(self) -> None:
        k = self._keys
        flat = await self._scripts["leaves_due"](
            keys=[k.leaves(), k.leave_names()], args=[clock.now_ms(), k.prefix, 100]
        )
        for i in range(0, len(flat), 3):
            room, user_id, username = (as_str(part) for part in flat[i : i + 3])
            if self._on_user_left is not None:
                await self._on_user_left(room, user_id, username)

    # --- the PresenceStore contract --------------------------------------------------------------

    def _room_keys(self, room: str) -> list[str]:
        k = self._keys
        return [k.presence(room, self._node_id), k.presence_nodes(room), k.users(room),
                k.leaves(), k.leave_names(), k.node_rooms(self._node_id), k.rooms()]

    @unavailable_on_redis_error
    async def add(self, room: str, member: Member) -> bool:
        fresh = await self._add(room, member)
        self._local[(room, member.conn_id)] = member
        return fresh

    async def _add(self, room: str, member: Member) -> bool:
        fresh = await self._scripts["presence_add"](
            keys=self._room_keys(room),
            args=[self._node_id, member.conn_id, orjson.dumps(member.to_dict()),
                  member.user_id, room],
        )
        return bool(fresh)

    async def remove(self, room: str, member: Member) -> None:
        """Never fails: while Redis is unreachable the removal is queued and retried."""
        self._local.pop((room, member.conn_id), None)
        deadline = clock.now_ms() + self._grace_ms
        try:
            await self._remove(room, member, deadline)
        except (RedisError, OSError):
            self._pending_removals.append((room, member, deadline))

    async def _remove(self, room: str, member: Member, deadline_ms: int) -> None:
        await self._scripts["presence_remove"](
            keys=[*self._room_keys(room), self._keys.nicks(room)],
            args=[self._node_id, member.conn_id, member.user_id, room, member.username,
                  deadline_ms, nick_key(member.nick) if member.nick else ""],
        )

    async def _alive_nodes(self) -> set[str]:
        alive = await self._redis.zrangebyscore(self._keys.nodes(), clock.now_ms(), "+inf")
        return {as_str(raw) for raw in alive}

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
        claimed = await self._scripts["claim_nick"](
            keys=[self._keys.nicks(room), self._keys.nodes()],
            args=[nick_key(nick), f"{self._node_id} {member.conn_id} {member.user_id}",
                  clock.now_ms()],
        )
        return bool(claimed)

    @unavailable_on_redis_error
    async def stats(self) -> dict[str, Any]:
        k = self._keys
        alive = sorted(await self._alive_nodes())
        rooms = sorted(as_str(raw) for raw in await self._redis.smembers(k.rooms()))
        async with self._redis.pipeline(transaction=False) as pipe:
            for node_id in alive:
                pipe.hget(k.node_info(node_id), "connections")
            for room in rooms:
                pipe.hlen(k.users(room))
            replies = await pipe.execute()
        nodes = {
            node_id: {"connections": int(replies[i] or 0), "alive": True}
            for i, node_id in enumerate(alive)
        }
        counts = {room: int(replies[len(alive) + i]) for i, room in enumerate(rooms)}
        return {"nodes": nodes, "rooms": {r: c for r, c in counts.items() if c}}

    def set_connection_count(self, count: int) -> None:
        self._connections = count
