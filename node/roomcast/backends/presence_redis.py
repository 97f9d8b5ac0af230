"""RedisPresence: cluster-wide presence in Redis hashes, with node leases.

Layout (names and slots in keys.py): per (room, node) a hash conn_id -> member JSON, so that a
whole node's entries in a room drop at once (lua/reap_node.lua); per room a users hash counting
each user's connections, so that user_joined/user_left are per user, a nicks hash, and the
room's pending user_left decisions (a zset user_id -> deadline and a hash of usernames).
Node-level: a zset of node leases, each node's info hash and the set of rooms where it has
entries. Cluster-wide: an index of the rooms that may have pending leaves. Every node, once a
second, reaps nodes whose lease ran out and announces every due user_left decision. A node
killed with -9 vanishes from queries as soon as its lease expires (node_lease_ttl, default
5 s), because queries read only live nodes' hashes.

Leases: what only the dead lose. The lease is renewed from a thread of its own with its own
synchronous Redis connection (``_LeaseKeeper``), a few times per lease, so that an event loop
busy with a fan-out, a burst of handshakes or a long garbage collection cannot starve it: a
pure-Python loop gives the GIL up every few milliseconds. A loop that has not turned for
``HUNG_AFTER`` seconds is hung, not busy: the thread stops renewing and the node is reaped like a
dead one. A reaper judges a lease lapsed only ``REAP_MARGIN_MS`` after its deadline (owner and
reaper compare two wall clocks), never right after a Redis stall (every lease lapsed then, see
``_may_reap``). A node stopped for longer than its lease (SIGSTOP, a VM freeze) is reaped all the
same: nothing of it can run. When it comes back its thread finds the lease gone and the node
repairs: it writes its entries back, and each user the cluster had stopped counting is reported
through ``on_user_back`` (the service announces user_joined again).

Expiry: every per-room key has a TTL (``room_ttl``, --idle-room-ttl, or ``key_ttl``'s floor),
set by each script that writes it and refreshed by every node with entries in the room a few
times per TTL (``_touch_rooms``); keys that empty are gone at once (Redis drops an empty hash,
set or zset). So a room nobody is in leaves nothing behind, even if the whole cluster died.

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
  its next renewal and writes them once more, after the reap.

Connections per user (the per-user connection limit): one hash per user, conn_id -> node_id, in
the user's own slot. A reaper does not know a dead node's users, so nobody cleans those entries
at once: they stop counting as soon as the node is judged dead (its lease lapsed past the
reapers' margin, or is gone), and the user's next open drops them (lua/open_connection.lua). A
node that finds its lease gone writes its own entries back, with its presence entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
import redis.cluster
import structlog
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from roomcast import clock
from roomcast.backends.keys import Keys
from roomcast.backends.presence import (
    Member,
    OnUserBack,
    OnUserLeft,
    check_limit,
    nick_key,
    nick_owner,
)
from roomcast.backends.redis_batch import Batcher
from roomcast.backends.redis_common import (
    REDIS_FAILURES,
    as_str,
    load_script,
    unavailable_on_redis_error,
)
from roomcast.config import Config

log = structlog.get_logger("roomcast.presence")

#: Seconds between reaps, user_left claims and key refreshes, and the longest pause between
#: lease renewals (which come at least four times per lease). A constant, not a setting: the
#: lease (--node-lease-ttl, default 5 s) must span several renewals, and user_left is announced
#: at most one tick after the grace window.
TICK = 1.0

#: Rooms read from the leave-rooms index, and due leaves popped from a room, in one call. A tick
#: goes on, batch after batch, until nothing due is left (at most MAX_PAGES pages of rooms).
BATCH = 100
MAX_PAGES = 100

#: Milliseconds past a lease's deadline before a reaper takes the node for dead. The deadline is
#: written by the owner's clock and read by the reaper's, and a renewal may be on its way.
REAP_MARGIN_MS = 1000

#: Seconds without a turn of the event loop after which the node counts as hung rather than
#: busy: the lease thread stops renewing, so peers reap it (its clients' pings time out around
#: then too). A constant: far above any pause a serving loop has, far below "forever".
HUNG_AFTER = 30.0

#: --idle-room-ttl's default, for a store built without one.
DEFAULT_ROOM_TTL = Config(node_id="-").idle_room_ttl

#: Rooms whose presence keys get their TTL refreshed in one tick (one pipeline).
TOUCH_BATCH = 1000


def key_ttl(room_ttl: float, lease_ttl: float) -> float:
    """Seconds a room's presence keys live without a refresh: ``room_ttl`` (--idle-room-ttl),
    but never so short that they could expire under a node that is not yet reaped. A node
    refreshes them every third of this; one whose loop hangs stops renewing its lease after
    HUNG_AFTER and is reaped a lease, the margin and a tick or two later, which must come first
    (a reap takes the node's connections out of the room's user counts; an expiry would not)."""
    return max(room_ttl, 3 * (HUNG_AFTER + lease_ttl + REAP_MARGIN_MS / 1000 + 2 * TICK))


#: Tries of claim_nick's read-then-swap when the holder keeps changing under it; then the nick
#: counts as taken (others are fighting over it).
NICK_ATTEMPTS = 3

#: Milliseconds a user's connections hash lives past the user's last open or close (each one
#: refreshes it; nothing else does). A constant: what it bounds is a hash of a user who stopped
#: connecting. Its cost: a user whose only activity is connections kept open longer than this
#: loses them from the count when the hash expires, and may then open up to the limit more.
USER_CONNS_TTL_MS = 24 * 3600 * 1000

#: Users whose connections hash one pipeline writes (re-registration) or cleans (shutdown).
USER_BATCH = 1000

SCRIPTS = ("presence_add", "presence_remove", "reap_node", "leaves_due", "claim_nick",
           "claim_due", "leave_index", "open_connection", "register_room")

#: Connection settings the lease thread's synchronous client takes over from the async client.
_SYNC_SETTINGS = ("host", "port", "db", "username", "password", "path", "socket_timeout",
                  "socket_connect_timeout")
_SYNC_CONNECTIONS: dict[str, Any] = {
    "Connection": redis.connection.Connection,
    "SSLConnection": redis.connection.SSLConnection,
    "UnixDomainSocketConnection": redis.connection.UnixDomainSocketConnection,
}


def sync_twin(client: aioredis.Redis, name: str, timeout: float) -> redis.Redis:
    """A synchronous client of the same Redis as ``client`` (same address, database,
    credentials and TLS), named ``name``, whose every call gives up after ``timeout`` seconds
    and is retried at most once: a renewal that takes longer than that is too late anyway.
    For a Redis Cluster client, a synchronous Redis Cluster client from the same seed."""
    if isinstance(client, AsyncRedisCluster):
        node = client.get_default_node() or next(iter(client.nodes_manager.startup_nodes.values()))
        kwargs = client.get_connection_kwargs()
        settings = {key: value for key, value in kwargs.items()
                    if key in ("username", "password") or key.startswith("ssl_")}
        if kwargs.get("connection_class") is not None and "SSL" in str(
                kwargs["connection_class"]):
            settings["ssl"] = True
        return redis.cluster.RedisCluster(
            host=node.host, port=int(node.port), client_name=name,
            socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1), max_connections=2, **settings)
    pool = client.connection_pool
    settings = {key: value for key, value in pool.connection_kwargs.items()
                if key in _SYNC_SETTINGS or key.startswith("ssl_")}
    for key in ("socket_timeout", "socket_connect_timeout"):
        settings[key] = min(settings.get(key) or timeout, timeout)
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=_SYNC_CONNECTIONS[pool.connection_class.__name__],
        max_connections=2, client_name=name, retry=Retry(NoBackoff(), 1), **settings))


class _LeaseKeeper:
    """Renews one node's lease from a thread of its own, so that the event loop's load cannot
    delay it (see the module docstring), and tells the loop what it found.

    Every attribute the loop reads is a plain value written by the thread (safe under the GIL):
    ``renewed_at`` when the last renewal succeeded (monotonic, 0 for never), ``reap_after`` the
    earliest time the loop may judge peers again after Redis stalled, ``losses`` how many times
    the lease was found gone or held by a reaper (the loop re-registers when it grows). The loop
    writes ``loop_beat`` on every turn it gets to (``beat``).
    """

    def __init__(self, client: redis.Redis, keys: Keys, node_id: str, lease_ms: int,
                 room_ttl_ms: int, connections: Callable[[], int]) -> None:
        self._client = client
        self._keys = keys
        self._node_id = node_id
        self._lease_ms = lease_ms
        self._room_ttl_ms = room_ttl_ms
        self._connections = connections
        self._log = log.bind(node_id=node_id)  # Threads do not see the loop's contextvars.
        self.renewed_at = 0.0
        self.reap_after = 0.0
        self.losses = 0
        self.loop_beat = clock.monotonic()
        self._hung = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{node_id}", daemon=True)

    def interval(self) -> float:
        return min(TICK, self._lease_ms / 4000)

    def beat(self) -> None:
        """The event loop turned (called on the loop)."""
        self.loop_beat = clock.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Renew no more; wait up to ``timeout`` for a renewal under way (blocking: call it in
        a thread of its own)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval()):
            stalled = clock.monotonic() - self.loop_beat
            if stalled > HUNG_AFTER:
                if not self._hung:
                    self._log.warning("event loop hung; lease no longer renewed",
                                      seconds=round(stalled, 1))
                self._hung = True
                continue
            if self._hung:
                self._log.info("event loop turning again; lease renewed")
                self._hung = False
            try:
                self.renew()
            except REDIS_FAILURES as exc:
                self._log.debug("lease renewal failed", error=str(exc))
            except Exception:
                self._log.error("lease renewal crashed", exc_info=True)

    def renew(self) -> None:
        """One renewal (from the thread, or from a worker thread at start)."""
        k = self._keys
        # Read the old score and renew in one transaction (one key, one slot), so that no reap
        # can slip between the check and the renewal unnoticed.
        with self._client.pipeline(transaction=True) as pipe:
            pipe.zscore(k.nodes(), self._node_id)
            pipe.zadd(k.nodes(), {self._node_id: clock.now_ms() + self._lease_ms})
            previous, _ = pipe.execute()
        now = clock.monotonic()
        if self.renewed_at and now - self.renewed_at > self._lease_ms / 1000:
            # No renewal got through for a whole lease: Redis (or this process) stalled, so
            # every peer's lease may have lapsed too. Give them one lease to renew before
            # judging anyone dead, or live users would get a false user_left. Written before
            # renewed_at, which the loop reads first (_may_reap).
            self.reap_after = now + self._lease_ms / 1000
        self.renewed_at = now
        if previous is None or float(previous) < 0:
            # No lease (Redis lost its data, or a reaper finished with us after a long pause)
            # or a reaper's hold on us (it is dropping our entries right now). The lease is
            # renewed before the entries are written back: a reaper still at work deletes the
            # lease when it is done, and then we write them again after the next renewal.
            self.losses += 1
        # Node-level keys, one command each (different slots). The rooms set lives as long as
        # the node's entries could (a reaper of this node needs it), and no longer.
        with self._client.pipeline(transaction=False) as pipe:
            pipe.hset(k.node_info(self._node_id), mapping={"connections": self._connections()})
            pipe.pexpire(k.node_info(self._node_id), self._lease_ms * 2)
            pipe.pexpire(k.node_rooms(self._node_id), self._room_ttl_ms)
            pipe.execute()


def entry_lock(room: str, conn_id: str) -> str:
    """The name of the lock of one presence entry (room names hold no spaces)."""
    return f"{room} {conn_id}"


class _Locks:
    """One asyncio lock per name (a room, a user), dropped again when nobody holds or waits for
    it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        held = self._locks.get(name)
        lock, users = held if held is not None else (asyncio.Lock(), 0)
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


class RedisPresence:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, node_id: str, grace: float, lease_ttl: float,
        room_ttl: float = DEFAULT_ROOM_TTL,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._node_id = node_id
        self._grace_ms = int(grace * 1000)
        self._lease_ms = int(lease_ttl * 1000)
        self._key_ttl_ms = int(key_ttl(room_ttl, lease_ttl) * 1000)
        self._scripts = {name: redis.register_script(load_script(name)) for name in SCRIPTS}
        #: The hot path's commands (entries written and removed, connections counted) from
        #: concurrent joins and opens go as one pipeline per round trip (redis_batch.py).
        self._batch = Batcher.for_backend(redis)
        self._connections = 0
        #: This node's entries, room -> conn_id -> member, so that they can be written again if
        #: Redis loses them.
        self._local: dict[str, dict[str, Member]] = {}
        #: When each room of _local last had its keys' TTL set (monotonic).
        self._touched: dict[str, float] = {}
        #: The keeper's ``losses`` count the last complete re-registration answered.
        self._reregistered = 0
        #: Removals that failed while Redis was unreachable, retried by the ticker.
        self._pending_removals: list[tuple[str, Member, int]] = []
        #: Serializes this node's writes per room: the room's entries and this node's rooms set
        #: change in separate calls, which must not interleave with another add/remove here.
        #: One lock per entry (room, connection): its write, its removal and its rewrite after
        #: Redis lost it never interleave, while joins of many connections to one room run at
        #: once (a room-wide lock made a join storm one join per two round trips).
        self._entry_locks = _Locks()
        #: room -> entries being written now (_write_entry), for _remove's last-entry case.
        self._registering: dict[str, int] = {}
        #: This node's open connections, user_id -> conn_ids, as counted in the users'
        #: connections hashes (written back after a lease loss, removed on shutdown).
        self._user_conns: dict[str, set[str]] = {}
        #: close_connection calls that failed while Redis was unreachable (and opens whose
        #: script call failed: it may have counted the connection), retried by the ticker. At
        #: most one per connection that reached Redis: without Redis an open fails earlier.
        self._pending_closes: dict[tuple[str, str], None] = {}
        #: Serializes this node's writes to each user's connections hash, so that a write-back
        #: cannot land after (and undo) a close of the same user's connection.
        self._user_locks = _Locks()
        self._on_user_left: OnUserLeft | None = None
        self._on_user_back: OnUserBack | None = None
        self._keeper: _LeaseKeeper | None = None
        self._beat: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Set by close(): the ticker stops at its next turn even if a cancellation was lost (a
        #: redis-py pipeline can swallow one that arrives just as its reply does).
        self._stop = asyncio.Event()

    async def start(self, on_user_left: OnUserLeft, on_user_back: OnUserBack | None = None
                    ) -> None:
        self._on_user_left = on_user_left
        self._on_user_back = on_user_back
        lease = self._lease_ms / 1000
        # A renewal and its one retry must both fit well inside the lease (plus the reapers'
        # margin): each attempt gives up after a quarter of it.
        self._keeper = _LeaseKeeper(
            sync_twin(self._redis, f"roomcast:{self._node_id}:lease", lease / 4), self._keys,
            self._node_id, self._lease_ms, self._key_ttl_ms, lambda: self._connections)
        with contextlib.suppress(*REDIS_FAILURES):
            await asyncio.to_thread(self._keeper.renew)
        self._keeper.start()
        self._keep_beating()
        self._task = asyncio.create_task(self._tick_forever(), name="presence-ticker")

    def _keep_beating(self) -> None:
        """Tell the lease thread, a few times per renewal, that the loop still turns."""
        if self._closed or self._keeper is None:
            return
        self._keeper.beat()
        loop = asyncio.get_running_loop()
        self._beat = loop.call_later(self._keeper.interval() / 2, self._keep_beating)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._beat is not None:
            self._beat.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._keeper is not None:
            # Stopped before the entries go: a renewal after the reap below would bring the
            # lease of a closed node back (until it lapsed).
            await asyncio.to_thread(self._keeper.stop, self._lease_ms / 1000)
        # A clean shutdown removes this node's entries at once; user_left waits for the grace
        # window (announced by a surviving node), so users who reconnect elsewhere do not flap.
        try:
            await self._reap(self._node_id, clock.now_ms() + self._grace_ms, force=True)
        except REDIS_FAILURES:
            log.warning("could not remove presence entries on shutdown", exc_info=True)
        # After the reap, which deleted the lease: from then on none of these counts anyway (a
        # dead node's entries do not), so removing them only spares the users' next opens.
        try:
            await self._drop_connections()
        except REDIS_FAILURES:
            log.warning("could not remove connection counts on shutdown", exc_info=True)
        await self._batch.close()

    # --- background work ---------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while not self._closed:
            try:
                await self._retry_removals()
                await self._retry_closes()
                await self._reregister()
                if self._may_reap():
                    await self._reap_dead()
                await self._announce_due_leaves()
                await self._touch_rooms()
            except asyncio.CancelledError:
                raise
            except REDIS_FAILURES as exc:
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

    async def _reregister(self) -> None:
        """Write every entry back once the lease thread found the lease gone (or held by a
        reaper); a re-registration cut short is finished on a later tick."""
        if self._keeper is None or self._keeper.losses == self._reregistered:
            return
        losses = self._keeper.losses
        entries = sum(len(conns) for conns in self._local.values())
        if entries:
            log.warning("re-registering presence", entries=entries)
        for room in list(self._local):
            await self._rewrite(room)
        await self._rewrite_connections()
        self._reregistered = losses

    async def _rewrite(self, room: str, user_id: str | None = None, report: bool = True
                       ) -> None:
        """Write this node's entries in ``room`` (of ``user_id`` only, if given) where Redis
        lost them; with ``report``, each user that Redis counts again goes to on_user_back."""
        back: list[Member] = []
        for member in list(self._local.get(room, {}).values()):
            if user_id is not None and member.user_id != user_id:
                continue
            async with self._entry_locks.hold(entry_lock(room, member.conn_id)):
                # Not if it was removed meanwhile: it must not come back after its removal.
                if member.conn_id in self._local.get(room, {}) and await self._write_entry(
                        room, member):
                    back.append(member)
        if room in self._local:
            self._touched[room] = clock.monotonic()
        for member in back:
            log.info("user back in presence", room=room, user_id=member.user_id)
            if report and self._on_user_back is not None and not self._closed:
                await self._on_user_back(room, member.user_id, member.username)

    def _may_reap(self) -> bool:
        """True when this node may judge others' leases now: its own renewals get through
        (so its view of Redis is current) and the last Redis stall is a lease behind."""
        keeper = self._keeper
        if keeper is None:
            return False
        now = clock.monotonic()
        return now - keeper.renewed_at <= self._lease_ms / 2000 and now >= keeper.reap_after

    async def _reap_dead(self) -> None:
        asked = clock.monotonic()
        # Lapsed leases, and holds of reapers that may have died (claim_due.lua decides).
        dead = await self._redis.zrangebyscore(
            self._keys.nodes(), "-inf", clock.now_ms() - REAP_MARGIN_MS)
        if clock.monotonic() - asked > TICK:
            return  # Redis answered late: the peers' renewals may be queued behind this.
        for raw in dead:
            node_id = as_str(raw)
            if node_id == self._node_id:
                continue  # Our own lease lapsed (a long pause): the keeper re-registers us.
            if not self._may_reap():
                return
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
            keys=[k.nodes()], args=[node_id, now - REAP_MARGIN_MS, now, hold]
        ):
            return -1
        dropped = 0
        for raw in await self._redis.smembers(k.node_rooms(node_id)):
            room = as_str(raw)
            count, earliest = await self._scripts["reap_node"](
                keys=self._room_keys(room, node_id), args=[node_id, deadline_ms,
                                                           self._key_ttl_ms],
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
        """Announce every user_left that is due, however many: rooms a page at a time, each
        room's leaves a batch at a time, until none is left (a mass disconnect is announced
        within this tick, not a batch per tick)."""
        skipped = 0
        for _ in range(MAX_PAGES):
            # Earliest first (holds, being negative, come before everything), so that a leave
            # due earlier is announced no later than one due after it. Rooms this tick could
            # not claim stay in front; the next page starts after them.
            rooms = await self._redis.zrangebyscore(
                self._keys.leave_rooms(), "-inf", clock.now_ms(), start=skipped, num=BATCH)
            for raw in rooms:
                if not await self._announce_room(as_str(raw)):
                    skipped += 1
            if len(rooms) < BATCH or self._closed:
                return

    async def _announce_room(self, room: str) -> bool:
        """Pop and announce the room's due leaves; False when the room was not this node's to
        look at (another holds it, or nothing is due any more)."""
        k = self._keys
        now = clock.now_ms()
        # Claimed with a hold rather than removed from the index: if this node dies before it
        # settles the room, the room stays indexed and another node looks once the hold runs
        # out. Two nodes at once would be harmless too: leaves_due.lua pops each leave
        # atomically, so each is announced once.
        hold = -(now + self._lease_ms)
        if not await self._scripts["claim_due"](
            keys=[k.leave_rooms()], args=[room, now, now, hold]
        ):
            return False
        gone: list[tuple[str, str]] = []
        while True:
            reply = await self._scripts["leaves_due"](
                keys=[k.leaves(room), k.leave_names(room), k.users(room)], args=[now, BATCH],
            )
            gone += [(as_str(reply[i]), as_str(reply[i + 1])) for i in range(1, len(reply), 2)]
            earliest = as_str(reply[0])
            if not earliest or float(earliest) > now:
                break  # Nothing due is left in the room (one more batch was due: go on).
        # Settle before announcing, so that a slow announcement holds nothing up. A leave
        # scheduled after leaves_due.lua looked was indexed by its remover after that, which
        # replaced our hold: leave_index.lua then keeps the remover's score (and ours, if
        # earlier) instead of dropping the room.
        await self._scripts["leave_index"](keys=[k.leave_rooms()], args=[room, earliest, hold])
        for user_id, username in gone:
            if self._on_user_left is not None and not self._closed:
                await self._on_user_left(room, user_id, username)
        return True

    async def _touch_rooms(self) -> None:
        """Refresh the TTL of the keys of every room this node has entries in, a few times per
        TTL; a room whose entries of this node Redis no longer has is written back."""
        now = clock.monotonic()
        due = [room for room, touched in self._touched.items()
               if now - touched > self._key_ttl_ms / 3000][:TOUCH_BATCH]
        if not due:
            return
        k = self._keys
        async with self._redis.pipeline(transaction=False) as pipe:
            for room in due:  # One key per command: the keys of one room, room after room.
                pipe.pexpire(k.presence(room, self._node_id), self._key_ttl_ms)
                pipe.pexpire(k.presence_nodes(room), self._key_ttl_ms)
                pipe.pexpire(k.users(room), self._key_ttl_ms)
                pipe.pexpire(k.nicks(room), self._key_ttl_ms)
            replies = await pipe.execute()
        for i, room in enumerate(due):
            if room not in self._local:
                continue  # Emptied meanwhile.
            self._touched[room] = now
            if not replies[4 * i]:
                log.warning("presence entries lost; writing them back", room=room)
                await self._rewrite(room)

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
        async with self._entry_locks.hold(entry_lock(room, member.conn_id)):
            fresh = await self._write_entry(room, member, register=room not in self._local)
            self._local.setdefault(room, {})[member.conn_id] = member
            self._touched.setdefault(room, clock.monotonic())
        return fresh

    async def _write_entry(self, room: str, member: Member, register: bool = True) -> bool:
        """Write one of this node's entries; True when its user was not present. Under its
        entry lock. ``register`` False: the room is in the node's rooms set already (it has
        entries here; a removal of the last one that races this write puts it back)."""
        k = self._keys
        # The room joins this node's rooms set before the entry exists, so that whoever reaps
        # this node finds it (if we die right here, a reaper visits a room with nothing of ours:
        # harmless). The set gets the room keys' TTL (the lease thread refreshes it). Counted
        # in _registering meanwhile: a removal of the room's last entry, which takes the room
        # out of the set, puts it back when it sees one under way (_remove).
        self._registering[room] = self._registering.get(room, 0) + 1
        try:
            if register:
                await self._register_room(room)
            fresh = await self._batch.script(
                self._scripts["presence_add"],
                [k.presence(room, self._node_id), k.presence_nodes(room), k.users(room),
                 k.leaves(room), k.leave_names(room)],
                [self._node_id, member.conn_id, orjson.dumps(member.to_dict()),
                 member.user_id, self._key_ttl_ms],
            )
        finally:
            left = self._registering.pop(room) - 1
            if left:
                self._registering[room] = left
        return bool(fresh)

    async def _register_room(self, room: str) -> None:
        """Put ``room`` in this node's rooms set (with the room keys' TTL): one script through
        the batcher, in the pipeline with the entry written after it. Until the node knows an
        entry of the room every join does this; the first joins of a storm, hundreds before
        the first reply, made one MULTI pipeline (and pooled connection) each."""
        await self._batch.script(self._scripts["register_room"],
                                 [self._keys.node_rooms(self._node_id)],
                                 [room, self._key_ttl_ms])

    @unavailable_on_redis_error
    async def restore(self, room: str, user_id: str) -> None:
        await self._rewrite(room, user_id, report=False)

    async def remove(self, room: str, member: Member) -> None:
        """Never fails: while Redis is unreachable the removal is queued and retried."""
        deadline = clock.now_ms() + self._grace_ms
        try:
            await self._remove(room, member, deadline)
        except REDIS_FAILURES:
            self._pending_removals.append((room, member, deadline))

    def _forget(self, room: str, conn_id: str) -> None:
        conns = self._local.get(room)
        if conns is None:
            return
        conns.pop(conn_id, None)
        if not conns:
            del self._local[room]
            self._touched.pop(room, None)

    async def _remove(self, room: str, member: Member, deadline_ms: int) -> None:
        async with self._entry_locks.hold(entry_lock(room, member.conn_id)):
            # Forgotten under the lock, so that a re-registration cannot write it back after
            # this removal.
            self._forget(room, member.conn_id)
            _, empty, earliest = await self._batch.script(
                self._scripts["presence_remove"], self._room_keys(room, self._node_id),
                [self._node_id, member.conn_id, member.user_id, member.username, deadline_ms,
                 nick_key(member.nick) if member.nick else "", self._key_ttl_ms],
            )
            # The leave exists in the room now; index it. If this fails, the retried removal
            # finds the connection gone but still returns the pending leave to index.
            await self._index_leaves(room, as_str(earliest))
            if int(empty):
                # Last: until the room is out of this node's rooms set, a reaper of this node
                # would still visit it (and index its leaves, should we die before the line
                # above). An add of another entry may have registered the room meanwhile (its
                # entry lock is not this one's): then the room goes back into the set.
                await self._redis.srem(self._keys.node_rooms(self._node_id), room)
                if room in self._local or self._registering.get(room):
                    await self._register_room(room)

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
    async def claim_nick(self, room: str, nick: str, member: Member, owner: str = "") -> bool:
        key = nick_key(nick)
        owner = nick_owner(member, owner)
        # The owner last: it may contain spaces (a user id), node and connection ids do not.
        claimant = f"{self._node_id} {member.conn_id} {owner}"
        for _ in range(NICK_ATTEMPTS):
            raw = await self._redis.hget(self._keys.nicks(room), key)
            holder = "" if raw is None else as_str(raw)
            if holder and holder != claimant:
                holder_node, _, holder_owner = holder.split(" ", 2)
                # The same owner may take its nick over (a reconnect before the old connection
                # is gone); another owner's only from a dead node. The lease is read in a call
                # of its own (another slot); the swap below fails if the holder changed since.
                if holder_owner != owner and await self._lease_alive(holder_node):
                    return False
            if await self._scripts["claim_nick"](
                keys=[self._keys.nicks(room)], args=[key, claimant, holder, self._key_ttl_ms]
            ):
                return True
        return False

    @unavailable_on_redis_error
    async def count(self, room: str) -> int:
        # A dead node's users count until it is reaped, as in stats().
        return int(await self._redis.hlen(self._keys.users(room)))

    async def _counted_nodes(self) -> list[str]:
        """The nodes whose connections count towards a user's limit: this one and every node
        a reaper would not take for dead (its lease lapsed less than REAP_MARGIN_MS ago: a
        renewal may be on its way). While this node's own view may be stale (its renewals do
        not get through, or Redis just stalled and every lease may have lapsed: _may_reap),
        every node with a lease counts, unless a reaper holds it: the entries dropped for a
        node that is alive after all would never come back, and its users could then exceed
        the limit."""
        floor = clock.now_ms() - REAP_MARGIN_MS if self._may_reap() else 0
        alive = await self._batch.call("ZRANGEBYSCORE", self._keys.nodes(), floor, "+inf")
        return sorted({as_str(raw) for raw in alive} | {self._node_id})

    @unavailable_on_redis_error
    async def open_connection(self, user_id: str, conn_id: str, limit: int) -> bool:
        check_limit(limit)
        async with self._user_locks.hold(user_id):
            # Read in a call of its own (the nodes zset is in another slot), as claim_nick
            # reads a holder's lease. A node judged alive here that dies before the script
            # runs still counts, this once: the user is refused rather than let past the limit.
            counted = await self._counted_nodes()
            try:
                opened = await self._batch.script(
                    self._scripts["open_connection"], [self._keys.user_connections(user_id)],
                    [conn_id, self._node_id, limit, USER_CONNS_TTL_MS, *counted],
                )
            except REDIS_FAILURES:
                # The script may have run and its reply been lost: the caller takes the
                # connection as not counted and will not close it, so uncount it later.
                self._pending_closes[(user_id, conn_id)] = None
                raise
            if opened:
                self._user_conns.setdefault(user_id, set()).add(conn_id)
                self._pending_closes.pop((user_id, conn_id), None)
        return bool(opened)

    async def close_connection(self, user_id: str, conn_id: str) -> None:
        """Never fails: while Redis is unreachable the close is queued and retried."""
        async with self._user_locks.hold(user_id):
            conns = self._user_conns.get(user_id)
            if conns is not None:
                conns.discard(conn_id)
                if not conns:
                    del self._user_conns[user_id]
            try:
                await self._uncount(user_id, conn_id)
            except REDIS_FAILURES:
                self._pending_closes[(user_id, conn_id)] = None

    async def _uncount(self, user_id: str, conn_id: str) -> None:
        """Drop one connection from its user's hash. Under the user's lock."""
        key = self._keys.user_connections(user_id)
        async with self._redis.pipeline(transaction=True) as pipe:  # One key: one slot.
            pipe.hdel(key, conn_id)
            pipe.pexpire(key, USER_CONNS_TTL_MS)
            await pipe.execute()

    async def _retry_closes(self) -> None:
        for user_id, conn_id in list(self._pending_closes):
            async with self._user_locks.hold(user_id):
                # Not if an open of the same connection got through meanwhile.
                if (user_id, conn_id) in self._pending_closes:
                    await self._uncount(user_id, conn_id)
                    del self._pending_closes[(user_id, conn_id)]

    async def _rewrite_connections(self) -> None:
        """Write this node's connections back into their users' hashes, after the lease was
        found gone: while this node counted as dead, a user's open (or Redis losing its data)
        may have dropped them. They are written whatever the limit: they are open."""
        users = sorted(self._user_conns)
        for start in range(0, len(users), USER_BATCH):
            batch = users[start : start + USER_BATCH]
            async with contextlib.AsyncExitStack() as held:
                # Every user of the batch locked, so that no close of theirs runs before its
                # connection is written back (it would be counted again for good).
                for user_id in batch:
                    await held.enter_async_context(self._user_locks.hold(user_id))
                async with self._redis.pipeline(transaction=False) as pipe:
                    for user_id in batch:  # One key per command: a user after another.
                        conns = self._user_conns.get(user_id)
                        if conns:
                            key = self._keys.user_connections(user_id)
                            pipe.hset(key, mapping=dict.fromkeys(sorted(conns), self._node_id))
                            pipe.pexpire(key, USER_CONNS_TTL_MS)
                    await pipe.execute()

    async def _drop_connections(self) -> None:
        """Remove this node's connections (and the closes still queued) from their users'
        hashes: a clean shutdown."""
        conns = {user_id: set(ids) for user_id, ids in self._user_conns.items()}
        for user_id, conn_id in self._pending_closes:
            conns.setdefault(user_id, set()).add(conn_id)
        users = sorted(conns)
        for start in range(0, len(users), USER_BATCH):
            async with self._redis.pipeline(transaction=False) as pipe:
                for user_id in users[start : start + USER_BATCH]:
                    pipe.hdel(self._keys.user_connections(user_id), *sorted(conns[user_id]))
                await pipe.execute()
        self._user_conns.clear()
        self._pending_closes.clear()

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
