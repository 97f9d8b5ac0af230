"""RedisBroker: publications travel between nodes over Redis pub/sub; history lives in streams.

One pub/sub connection per node. Every publish of a stored message runs lua/publish.lua, which
assigns the offset, appends to the stream and publishes in one atomic step, so that history order
and live order cannot disagree. When Redis goes away the reader logs it, retries with capped
exponential backoff and full jitter, resubscribes every room once Redis is back and tells the node
(``on_resubscribed``), which refills from history what was published in between. Publishes in
between raise BrokerUnavailable (never a silent drop). An idempotent publish checks and records
its key (``keys.idempotency``, in the room's slot) inside the same script. Control payloads go to
every node over the node-wide ``keys.control()`` channel, which every reader subscribes first.

Health (redis_common.RedisHealth): a write probe every second on a connection of its own (SET of
the node's probe key, with an expiry) tells readiness whether Redis is reachable and writable;
every failure the node sees is counted and logged by kind there. Each time the reader connects,
the node checks Redis' pub/sub output-buffer limit (``check_pubsub_limit``): a limit too low for
a node that falls behind for a moment makes Redis cut its pub/sub connection.

Pub/sub frame: ``b"<offset> <epoch> <ts_us> <origin>\\n" + envelope``; offset 0 = ephemeral event.
The consecutive publishes of one room that one pipeline carries run as one call of publish.lua
(``_PublishQueue.merged``); each is still its own pub/sub frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from roomcast import clock
from roomcast.backends.broker import (
    IDEMPOTENCY_WINDOW,
    BrokerUnavailable,
    OnControl,
    OnPublication,
    OnResubscribed,
    Publication,
    idempotency_window_ms,
)
from roomcast.backends.history import Retention, new_epoch
from roomcast.backends.keys import Keys, shard
from roomcast.backends.redis_batch import Batcher, Queued, pack_args
from roomcast.backends.redis_common import (
    REDIS_FAILURES,
    RedisHealth,
    as_str,
    load_script,
    unavailable_on_redis_error,
)
from roomcast.backends.redis_pubsub import Subscription
from roomcast.config import Config
from roomcast.protocol.envelopes import finish_message

log = structlog.get_logger("roomcast.broker")

#: First pause before reconnecting to Redis; doubles up to --redis-retry-max.
BACKOFF_BASE = 0.1
#: Seconds the pub/sub reader waits for a message before checking the connection's liveness,
#: and seconds of silence after which it PINGs. Constants: they only bound how soon a
#: half-open connection is noticed (at most PUBSUB_IDLE_PING + --redis-timeout + a tick).
PUBSUB_READ_TICK = 1.0
PUBSUB_IDLE_PING = 5.0
#: Most publishes sent to Redis in one pipeline (one round trip); more wait for the next one.
#: A constant: large enough that a burst reaches the other nodes in a few large pub/sub
#: batches, each one flush to every member (docs/BENCHMARKS.md, "the publish window"), small
#: enough that one MULTI/EXEC keeps Redis busy for a few milliseconds (about 20 us per
#: publish) and its replies are a few tens of KB.
PUBLISH_BATCH = 512
#: Most envelope bytes of the consecutive publishes of one room that a pipeline merges into one
#: run of publish.lua (_PublishQueue.merged). A constant: it bounds the arguments of one script
#: call and how long Redis runs it (about 8 us per message).
MERGE_BYTES = 256 * 1024

#: Seconds between two write probes. A constant: readiness should follow Redis within about a
#: second, and one tiny SET per second and node costs Redis nothing.
PROBE_INTERVAL = 1.0
#: Lifetime of the probe key: it disappears a few probes after its node stops.
PROBE_TTL_MS = 5000

#: The pub/sub output-buffer limit recommended in docs/RUNBOOK.md (section 8): Redis cuts a
#: subscriber whose unread output passes the hard limit, or stays above the soft one for its
#: seconds. Redis' default (32 MB hard, 8 MB for 60 s) is a stall of well under a second for a
#: node whose rooms receive tens of MB/s; size it as bytes/s of the node's rooms x the longest
#: stall it should survive.
RECOMMENDED_PUBSUB_LIMIT = (256 * 1024 * 1024, 64 * 1024 * 1024, 60)
PUBSUB_LIMIT_COMMAND = 'CONFIG SET client-output-buffer-limit "pubsub 256mb 64mb 60"'
_UNITS = {"b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3,
          "gb": 1024**3}


def parse_frame(channel: bytes, data: bytes,
                room_of_channel: Callable[[str], str] | None = None) -> Publication:
    """Split a pub/sub frame into its header fields and the envelope bytes.

    The header's fifth field, when there is one, is the room (a partition's channel carries
    several rooms); otherwise the room is the channel's (``room_of_channel``).
    """
    header, _, payload = data.partition(b"\n")
    fields = header.split(b" ", 4)
    offset, epoch, ts_us, origin = fields[:4]
    if len(fields) == 5:
        room = fields[4].decode()
    elif room_of_channel is not None:
        room = room_of_channel(channel.decode())
    else:
        raise ValueError("a frame without its room on a channel of no room")
    # An event's header carries "-" for its (absent) epoch: events have none, as in memory.
    return Publication(
        room, payload, int(offset), "" if epoch == b"-" else epoch.decode(), origin.decode(),
        int(ts_us),
    )


def event_frame(payload: bytes, origin: str, room: str | None = None) -> bytes:
    """The frame of an ephemeral event; with ``room``, naming it (a partition's channel)."""
    tail = origin if room is None else f"{origin} {room}"
    return b"0 - %d %s\n" % (clock.now_us(), tail.encode()) + payload


def _memory(text: str) -> int:
    """A Redis memory figure (``33554432``, ``32mb``, ``1gb``) in bytes."""
    lowered = text.lower()
    digits = lowered.rstrip("kmgb")
    return int(digits) * _UNITS.get(lowered[len(digits):] or "b", 1)


def pubsub_limit(value: str) -> tuple[int, int, int] | None:
    """(hard bytes, soft bytes, soft seconds) of the pubsub class in a
    ``client-output-buffer-limit`` value (``normal 0 0 0 replica ... pubsub 33554432 8388608
    60``); None when the value names no pubsub class."""
    words = value.split()
    for i in range(0, len(words) - 3, 4):
        if words[i].lower() == "pubsub":
            return _memory(words[i + 1]), _memory(words[i + 2]), int(words[i + 3])
    return None


def pubsub_limit_too_low(limit: tuple[int, int, int]) -> bool:
    """True when the hard limit is below the recommended one (0 means no limit: fine)."""
    hard = limit[0]
    return hard != 0 and hard < RECOMMENDED_PUBSUB_LIMIT[0]


class RedisBroker:
    """Broker over one Redis: pub/sub for fan-out, streams for history."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, config: Config,
        pubsub_client: aioredis.Redis | None = None,
        probe_client: aioredis.Redis | None = None,
        health: RedisHealth | None = None,
        retention: Retention | None = None,
        shards: list[tuple[aioredis.Redis, aioredis.Redis, aioredis.Redis]] | None = None,
    ) -> None:
        self._redis = redis
        # The reader's own client (see redis_common.connect): a lost pub/sub connection must
        # surface here, so that the resubscribe goes through the node's refill.
        self._pubsub_client = pubsub_client or redis
        # The probe's own client: a command pool busy with a burst must not delay the probe
        # (readiness would then report the node's own queue, not Redis).
        self._probe_client = probe_client or redis
        #: Client-side sharding (several --redis-url): each shard's (commands, pub/sub, probe)
        #: clients; the first shard's are the ones above. One Redis: just those.
        self._shards = shards or [(redis, self._pubsub_client, self._probe_client)]
        self._keys = keys
        self._node_id = config.node_id
        #: What this node knows of its Redis (readiness, error counts): backends.health_of.
        self.health = health or RedisHealth()
        #: Each room's (history size, TTL): its namespace's, else the flags'.
        self._retention: Retention = retention or (
            lambda room: (config.history_size, config.history_ttl))
        self._subscribe_timeout = config.redis_timeout
        self._backoff_cap = config.redis_retry_max
        self._publish_script = redis.register_script(load_script("publish"))
        #: Partitioned channels and sharded pub/sub (--redis-cluster): see keys.Keys.
        self._sharded = keys.partitions > 0
        #: The publish queue of each shard (one, but with client-side sharding).
        self._queues = [_PublishQueue(client, self._sharded, self.health)
                        for client, _, _ in self._shards]
        #: channel -> the rooms subscribed through it (one each without partitions): the rooms
        #: the node wants, which every (re)connect subscribes.
        self._channel_rooms: dict[str, set[str]] = {}
        #: Channels the current connections confirmed.
        self._live: set[str] = set()
        self._pending: dict[str, asyncio.Future[None]] = {}
        #: The current pub/sub connections: one (key "") on one Redis; one per master of a
        #: Redis Cluster (by node name), the first of which also carries the control channel.
        self._subs: dict[str, Subscription] = {}
        self._control_channel = keys.control().encode()
        #: The rooms the current connections subscribed, whether it is a resubscribe, and how
        #: many confirmations are still to come before the node counts as connected.
        self._resubscribed: tuple[list[str], bool] = ([], False)
        self._awaiting = 0
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._limit_check: asyncio.Task[None] | None = None
        self._on_publication: OnPublication | None = None
        self._on_resubscribed: OnResubscribed | None = None
        self._on_control: OnControl | None = None
        self.health.watch_connection(self._connected.is_set)

    @property
    def available(self) -> bool:
        return self._connected.is_set()

    async def start(
        self, on_publication: OnPublication, on_resubscribed: OnResubscribed | None = None,
        on_control: OnControl | None = None,
    ) -> None:
        self._on_publication = on_publication
        self._on_resubscribed = on_resubscribed
        self._on_control = on_control
        self._reader = asyncio.create_task(self._read_forever(), name="redis-pubsub-reader")
        self._prober = asyncio.create_task(self._probe_forever(), name="redis-probe")

    async def wait_connected(self, within: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), within)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        for task in (self._reader, self._prober, self._limit_check):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reader = self._prober = self._limit_check = None
        for queue in self._queues:
            await queue.close()
        self._connected.clear()
        clients = [client for shard in self._shards for client in shard]
        for client in {id(client): client for client in clients}.values():
            with contextlib.suppress(*REDIS_FAILURES):
                await client.aclose()

    # --- subscriptions ----------------------------------------------------------------------

    @unavailable_on_redis_error
    async def subscribe(self, room: str) -> None:
        channel = self._keys.channel(room)
        self._channel_rooms.setdefault(channel, set()).add(room)
        if not self._connected.is_set() or not self._subs:
            # The reader subscribes every room when it (re)connects; the caller must not think
            # it will get live messages before then.
            raise BrokerUnavailable("redis is unavailable")
        if channel in self._live:  # Another room of its partition has it already.
            return
        waiter = self._pending.get(channel)
        if waiter is None or waiter.done():
            sub = self._subscription_of(channel)
            waiter = self._pending[channel] = asyncio.get_running_loop().create_future()
            if self._sharded:
                sub.ssubscribe(channel)
            else:
                sub.subscribe(channel)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._subscribe_timeout)
        except TimeoutError:
            self.health.failed(RedisTimeoutError("subscription not confirmed in time"),
                               "SUBSCRIBE")
            raise BrokerUnavailable("redis did not confirm the subscription") from None

    async def unsubscribe(self, room: str) -> None:
        channel = self._keys.channel(room)
        rooms = self._channel_rooms.get(channel)
        if rooms is not None:
            rooms.discard(room)
            if rooms:
                return  # Other rooms of its partition still need the channel.
            del self._channel_rooms[channel]
        self._live.discard(channel)
        self._pending.pop(channel, None)
        if self._connected.is_set() and self._subs:
            with contextlib.suppress(BrokerUnavailable):
                sub = self._subscription_of(channel)
                if self._sharded:
                    sub.sunsubscribe(channel)
                else:
                    sub.unsubscribe(channel)

    def _subscription_of(self, channel: str) -> Subscription:
        """The connection that carries ``channel``: the one connection, or (sharded) the one
        to the master of the channel's slot. A slot whose master has no connection here means
        the cluster's topology changed: every connection starts over (and the node refills)."""
        if not self._sharded:
            return self._subs[str(self._shard(self._keys.room_of_channel(channel)))]
        node = self._pubsub_client.get_node_from_key(channel)  # type: ignore[attr-defined]
        sub = self._subs.get(node.name) if node is not None else None
        if sub is None:
            self._abort_all("the cluster's topology changed")
            raise BrokerUnavailable("redis cluster topology changed")
        return sub

    def _abort_all(self, reason: str) -> None:
        for sub in self._subs.values():
            sub.abort(reason)

    async def _read_forever(self) -> None:
        backoff = BACKOFF_BASE
        first = True
        while True:
            tasks: list[asyncio.Task[None]] = []
            try:
                await self._open(resubscribed=not first)
                for sub in self._subs.values():
                    tasks.append(asyncio.create_task(sub.run(), name="redis-pubsub-connection"))
                    tasks.append(asyncio.create_task(self._watch(sub),
                                                     name="redis-pubsub-watchdog"))
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # Raises: a connection ends only by failing.
            except asyncio.CancelledError:
                raise
            except REDIS_FAILURES as exc:
                self.health.failed(exc, "pubsub")
                if self._connected.is_set():
                    log.warning("redis connection lost", error=str(exc))
                    backoff = BACKOFF_BASE
                else:
                    log.warning("redis unreachable", error=str(exc), retry_in=round(backoff, 2))
            except Exception:
                # Task boundary: whatever went wrong, the reader must live on; fresh
                # connections and the resubscribe's refill are the safe way back.
                log.error("redis pubsub reader crashed; reconnecting", exc_info=True)
            finally:
                self._connected.clear()
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await task
                subs, self._subs = self._subs, {}
                self._live.clear()
                for waiter in self._pending.values():
                    if not waiter.done():
                        waiter.set_exception(BrokerUnavailable("redis connection lost"))
                        waiter.exception()  # Mark retrieved: nobody may be waiting any more.
                self._pending.clear()
                for sub in subs.values():
                    with contextlib.suppress(*REDIS_FAILURES, RuntimeError):
                        await sub.close()
            first = False
            # Full jitter (AWS architecture blog): spreads a cluster's reconnects to Redis.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, self._backoff_cap)

    async def _open(self, resubscribed: bool) -> None:
        """Open the pub/sub connection(s) and subscribe the control channel and every room's
        channel; the node counts as connected once Redis confirmed them all (_confirmed), so
        that a refill, read after that, misses nothing published since."""
        rooms = [room for names in self._channel_rooms.values() for room in names]
        channels = sorted(self._channel_rooms)
        self._resubscribed = (rooms, resubscribed)
        self._awaiting = 1 + len(channels)
        if not self._sharded:
            # One connection per Redis (one, or each shard's); the control channel, which
            # also keeps a connection in subscribed mode with no rooms, on the first.
            for number, (_, pubsub, _) in enumerate(self._shards):
                pool = pubsub.connection_pool
                connection = pool.make_connection()  # type: ignore[no-untyped-call]  # unannotated in redis-py
                self._subs[str(number)] = await Subscription.open(
                    connection, self._message, self._confirmed)
            by_sub: dict[Subscription, list[str]] = {}
            for channel in channels:
                by_sub.setdefault(self._subscription_of(channel), []).append(channel)
            first = self._subs["0"]
            first.subscribe(self._keys.control(), *by_sub.pop(first, []))
            for sub, sub_channels in by_sub.items():
                sub.subscribe(*sub_channels)  # One command per shard's connection.
            return
        cluster: Any = self._pubsub_client
        # The topology now: after a failover, the promoted replicas are the masters.
        await cluster.nodes_manager.initialize()
        masters = cluster.get_primaries()
        for node in masters:
            connection = node.connection_class(**node.connection_kwargs)
            self._subs[node.name] = await Subscription.open(
                connection, self._message, self._confirmed)
        # PUBLISH reaches every node of a Redis Cluster: the control channel on one is enough.
        self._subs[masters[0].name].subscribe(self._keys.control())
        for channel in channels:
            # One SSUBSCRIBE per channel: a command's channels must share a slot.
            self._subscription_of(channel).ssubscribe(channel)

    async def _watch(self, sub: Subscription) -> None:
        """Liveness: a pub/sub connection that went half-open (a Redis host gone, a NAT entry
        dropped) delivers nothing and fails nothing. When it has been idle for
        PUBSUB_IDLE_PING, a PING goes out; no answer within --redis-timeout counts as a lost
        connection, so the resubscribe and its refill bring back what was missed."""
        loop = asyncio.get_running_loop()
        pinged_at: float | None = None
        while True:
            await asyncio.sleep(PUBSUB_READ_TICK)
            now = loop.time()
            if pinged_at is not None and sub.last_seen <= pinged_at:
                if now - pinged_at > self._subscribe_timeout:
                    sub.abort("redis pubsub connection did not answer a PING")
                    return
                continue
            pinged_at = None
            if now - sub.last_seen > PUBSUB_IDLE_PING:
                pinged_at = now
                sub.ping()

    def _message(self, kind: bytes, channel: bytes, data: bytes) -> None:
        """Subscription's callback for every message, in the order Redis sent them."""
        if channel == self._control_channel:
            if self._on_control is not None:
                self._on_control(data)
            return
        if self._on_publication is None:
            return
        try:
            publication = parse_frame(channel, data, self._keys.room_of_channel)
        except (ValueError, UnicodeDecodeError):
            # Not a roomcast frame (someone else PUBLISHed on our channel): drop it.
            log.warning("dropped a pub/sub message that is not a roomcast frame",
                        channel=as_str(channel))
            return
        self._on_publication(publication)

    def _confirmed(self, kind: bytes, channel: bytes) -> None:
        """Subscription's callback for every (un)subscribe confirmation."""
        name = as_str(channel)
        if kind == b"sunsubscribe" and name in self._live:
            # Not asked for: Redis moved the channel's slot to another shard (a resharding).
            # Start over on the new topology; the refill covers what was published meanwhile.
            self._abort_all("a sharded channel's slot moved")
            return
        if kind not in (b"subscribe", b"ssubscribe"):
            return
        if name != self._keys.control() and name in self._channel_rooms:
            self._live.add(name)
        if not self._connected.is_set():
            self._awaiting -= 1
            if self._awaiting <= 0:
                rooms, resubscribed = self._resubscribed
                self._connected.set()
                log.info("redis pubsub connected", rooms=len(rooms),
                         connections=len(self._subs))
                self._start_limit_check()
                if resubscribed and rooms and self._on_resubscribed is not None:
                    self._on_resubscribed(rooms)
        waiter = self._pending.pop(name, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- health -----------------------------------------------------------------------------

    async def _probe_forever(self) -> None:
        """Write the node's probe key every PROBE_INTERVAL: the readiness verdict."""
        key = self._keys.probe(self._node_id)
        while True:
            try:
                for _, _, probe in self._shards:  # Every shard must take writes.
                    await probe.set(key, clock.now_ms(), px=PROBE_TTL_MS)
            except REDIS_FAILURES as exc:
                self.health.probed(exc)
            except Exception:
                log.error("redis probe crashed", exc_info=True)
            else:
                self.health.probed(None)
            self.health.flush()
            await asyncio.sleep(PROBE_INTERVAL)

    def _start_limit_check(self) -> None:
        if self._limit_check is None or self._limit_check.done():
            self._limit_check = asyncio.create_task(self._check_limit_logged(),
                                                    name="redis-pubsub-limit-check")

    async def _check_limit_logged(self) -> None:
        try:
            await self.check_pubsub_limit()
        except Exception:
            log.error("redis pubsub limit check crashed", exc_info=True)

    async def check_pubsub_limit(self) -> tuple[int, int, int] | None:
        """Read Redis' pub/sub output-buffer limit; log a WARNING when its hard limit is below
        RECOMMENDED_PUBSUB_LIMIT, or an INFO line when it cannot be read (CONFIG is often
        disabled or renamed on managed Redis). Returns the limit read, if any."""
        try:
            reply = await self._probe_client.config_get("client-output-buffer-limit")
        except ResponseError as exc:
            log.info("could not check redis pubsub output buffer limit",
                     error_type=type(exc).__name__, error=str(exc),
                     recommended=PUBSUB_LIMIT_COMMAND)
            return None
        except REDIS_FAILURES:
            return None  # Redis went away again: the reader checks on its next connect.
        raw = next(iter(reply.values()), b"") if isinstance(reply, dict) else b""
        limit = pubsub_limit(as_str(raw))
        if limit is None:
            log.info("could not check redis pubsub output buffer limit",
                     error="no pubsub class in CONFIG GET client-output-buffer-limit",
                     recommended=PUBSUB_LIMIT_COMMAND)
        elif pubsub_limit_too_low(limit):
            hard, soft, seconds = RECOMMENDED_PUBSUB_LIMIT
            log.warning(
                "redis pubsub output buffer limit is low",
                hard=limit[0], soft=limit[1], soft_seconds=limit[2],
                recommended_hard=hard, recommended_soft=soft, recommended_soft_seconds=seconds,
                command=PUBSUB_LIMIT_COMMAND,
            )
        else:
            log.info("redis pubsub output buffer limit checked", hard=limit[0], soft=limit[1],
                     soft_seconds=limit[2])
        return limit

    # --- publishing -------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def publish(
        self, room: str, prefix: bytes, origin: str, idempotency_key: str | None = None,
        window: float = IDEMPOTENCY_WINDOW,
    ) -> Publication:
        if not self._connected.is_set():
            raise BrokerUnavailable("redis is unavailable")
        size, ttl = self._retention(room)
        keys = [self._keys.meta(room), self._keys.stream(room)]
        # str and int only, by construction: a run's shared arguments are packed when its
        # batch is sent (_Publish.joined), where a DataError would fail the whole batch.
        common: list[bytes | str | int] = [
            self._keys.channel(room), int(size), int(ttl * 1000), new_epoch(),
            "SPUBLISH" if self._sharded else "PUBLISH", 0,
        ]
        if idempotency_key is not None:
            # KEYS[3] carries the room's hash tag: the check, the publish and the record are
            # one script in the room's slot (see lua/publish.lua).
            keys.append(self._keys.idempotency(room, idempotency_key))
            common[-1] = idempotency_window_ms(window)
        message = (prefix, self._frame_origin(origin, room), clock.now_us())
        # Nothing awaited before this line: publishes enter the queue in the order they were
        # called, which is the order Redis runs them (one pipeline at a time, in order), so one
        # connection's publishes keep their order however many are in flight.
        offset, epoch, duplicate = await self._queues[self._shard(room)].publish(
            self._publish_script, keys, common, message)
        offset, epoch = int(offset), as_str(epoch)
        if duplicate:
            return Publication(room, b"", offset, epoch, origin, 0, duplicate=True)
        return Publication(room, finish_message(prefix, offset, epoch), offset, epoch, origin)

    def _frame_origin(self, origin: str, room: str) -> str:
        """The frame header's last field(s): the origin, and the room on a partition's
        channel, which carries several (parse_frame)."""
        return f"{origin} {room}" if self._sharded else origin

    def _shard(self, room: str) -> int:
        """The index of the room's shard (0 without client-side sharding)."""
        return shard(room, len(self._shards))

    @unavailable_on_redis_error
    async def publish_event(self, room: str, payload: bytes, origin: str = "") -> None:
        if not self._connected.is_set():
            raise BrokerUnavailable("redis is unavailable")
        # Through the publish queue: one pipeline with the messages around it, and in their
        # order (a typing event after a message stays after it).
        channel = self._keys.channel(room)
        if self._sharded:
            await self._queues[0].call("SPUBLISH", channel, event_frame(payload, origin, room))
        else:
            await self._queues[self._shard(room)].call(
                "PUBLISH", channel, event_frame(payload, origin))

    @unavailable_on_redis_error
    async def publish_control(self, payload: bytes) -> None:
        if not self._connected.is_set():
            raise BrokerUnavailable("redis is unavailable")
        await self._redis.publish(self._keys.control(), payload)


class _PublishQueue(Batcher):
    """A shard's publishes and events, PUBLISH_BATCH at most per pipeline (one round trip), one
    pipeline at a time: while one is in flight the next batch gathers, and Redis runs them in
    the order they were called. A failed pipeline fails each of its publishes (the caller
    answers 'unavailable'; with an idempotency key a retry is safe), never a later one.

    On one Redis a batch is a MULTI/EXEC, inside which no other client runs: a NOSCRIPT means
    the script was missing for every call of it, none ran, and they all run again, in order
    (a flush between the load and the rerun fails them again: 'unavailable'). A Redis Cluster
    pipeline is no transaction (redis-py splits it by node): another client's SCRIPT LOAD may
    have run between two of its calls, so a later call of the same room may have run where an
    earlier one got NOSCRIPT. Running the earlier one now would put it after the later one: it
    stays refused ('unavailable', nothing done) instead. A publish's tag is its room's meta
    key; an event has none."""

    def __init__(self, client: Any, sharded: bool, health: RedisHealth) -> None:
        # A batch that may have run is never sent again: its publishes fail ('unavailable').
        super().__init__(client, transaction=not sharded, limit=PUBLISH_BATCH, health=health,
                         resend=False)

    def publish(self, script: AsyncScript, keys: list[str], common: list[Any],
                message: tuple[bytes, str, int]) -> asyncio.Future[Any]:
        """Queue a publish of ``message`` (envelope prefix, origin, timestamp): publish.lua's
        ARGV are ``common``, then the count, then each message's three. Its reply is the
        script's, as if it ran alone, also when it shares a run with the publishes of the same
        room next to it in the batch (``merged``)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        command = ("EVALSHA", script.sha, len(keys), *keys, *common, 1, *message)
        return self.push(_Publish(command, script, keys[0], future, keys, common, message,
                                  pack_args(message) if self.wired else b""))

    async def pipeline(self, batch: list[Queued]) -> list[Any]:
        """Send ``batch`` with the runs of consecutive publishes of one room merged, each into
        one run of publish.lua (which stores and publishes each message as its own call did),
        and give each publish its own reply: its offset is the run's first plus its place in
        it. Redis runs the merged call where the first publish of the run stood, and the others
        of the run came right after it in the batch: the order is the same. A failure of the
        merged call is each of its publishes' failure (and one failure in the node's Redis
        error counts, as the call is one command)."""
        sent, spans = self.merged(batch)
        replies = await super().pipeline(sent)
        if len(sent) == len(batch):
            return replies
        out: list[Any] = []
        for reply, span in zip(replies, spans, strict=True):
            if span == 1 or isinstance(reply, BaseException):
                out.extend([reply] * span)
            else:
                first, epoch, duplicate = reply
                out.extend([int(first) + i, epoch, duplicate] for i in range(span))
        return out

    def merged(self, batch: list[Queued]) -> tuple[list[Queued], list[int]]:
        """What to send for ``batch``, and how many of its commands each stands for. A run is
        consecutive publishes of one room without an idempotency key (that one checks and
        records its key for itself), of MERGE_BYTES of envelopes at most."""
        sent: list[Queued] = []
        spans: list[int] = []
        run: list[_Publish] = []
        size = 0
        for queued in batch:
            joins = (isinstance(queued, _Publish) and queued.mergeable and run
                     and run[0].mergeable and queued.tag == run[0].tag
                     and size + len(queued.message[0]) <= MERGE_BYTES)
            if run and not joins:
                sent.append(run[0].joined(run, self.wired))
                spans.append(len(run))
                run, size = [], 0
            if isinstance(queued, _Publish):
                run.append(queued)
                size += len(queued.message[0])
            else:
                sent.append(queued)
                spans.append(1)
        if run:
            sent.append(run[0].joined(run, self.wired))
            spans.append(len(run))
        return sent, spans

    def rerunnable(self, batch: list[Queued], replies: list[Any]) -> list[int]:
        if self._transaction:  # One Redis: every NOSCRIPT call, as the base class does.
            return super().rerunnable(batch, replies)
        ran_later: set[str] = set()
        keep = []
        for i in range(len(batch) - 1, -1, -1):
            room = batch[i].tag
            if room is None:
                continue
            if isinstance(replies[i], NoScriptError):
                if room not in ran_later:
                    keep.append(i)
            else:  # Ran, or may have (an error in place: a lost connection, a timeout).
                ran_later.add(room)
        return sorted(keep)


class _Publish(Queued):
    """A publish waiting in a _PublishQueue: its script's KEYS, the ARGV common to a run of
    publishes of its room, its own message's three, and those three packed (on a batcher's
    own wire), so that a run is packed by joining them under one header."""

    __slots__ = ("common", "keys", "message", "tail")

    def __init__(self, command: tuple[Any, ...], script: AsyncScript, tag: str,
                 future: asyncio.Future[Any], keys: list[str], common: list[Any],
                 message: tuple[bytes, str, int], tail: bytes) -> None:
        super().__init__(command, script, tag, future)
        self.keys = keys
        self.common = common
        self.message = message
        self.tail = tail

    @property
    def mergeable(self) -> bool:
        """False for a publish with an idempotency key (KEYS[3]): it runs alone."""
        return len(self.keys) == 2

    def joined(self, run: list[_Publish], wired: bool) -> Queued:
        """The one command of ``run`` (this publish first): this one alone, or a new one."""
        head = ("EVALSHA", self.command[1], len(self.keys), *self.keys, *self.common, len(run))
        if len(run) == 1:
            if wired and not self.packed:
                self.packed = b"*%d\r\n" % len(self.command) + pack_args(head) + self.tail
            return self
        command = head + tuple(arg for publish in run for arg in publish.message)
        packed = b""
        if wired:
            packed = (b"*%d\r\n" % len(command) + pack_args(head)
                      + b"".join(publish.tail for publish in run))
        return Queued(command, self.script, self.tag, self.future, packed)
