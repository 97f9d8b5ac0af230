"""RedisBroker: publications travel between nodes over Redis pub/sub; history lives in streams.

One pub/sub connection per node. Every publish of a stored message runs lua/publish.lua, which
assigns the offset, appends to the stream and publishes in one atomic step, so that history order
and live order cannot disagree. When Redis goes away the reader logs it, retries with capped
exponential backoff and full jitter, resubscribes every room once Redis is back and tells the node
(``on_resubscribed``), which refills from history what was published in between. Publishes in
between raise BrokerUnavailable (never a silent drop).

Pub/sub frame: ``b"<offset> <epoch> <ts_us> <origin>\\n" + envelope``; offset 0 = ephemeral event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from roomcast import clock
from roomcast.backends.broker import (
    BrokerUnavailable,
    OnPublication,
    OnResubscribed,
    Publication,
)
from roomcast.backends.history import new_epoch
from roomcast.backends.keys import Keys
from roomcast.backends.redis_common import as_str, load_script, unavailable_on_redis_error
from roomcast.config import Config
from roomcast.protocol.envelopes import finish_message

log = structlog.get_logger("roomcast.broker")

#: First pause before reconnecting to Redis; doubles up to --redis-retry-max.
BACKOFF_BASE = 0.1


def parse_frame(room: str, data: bytes) -> Publication:
    """Split a pub/sub frame into its header fields and the envelope bytes."""
    header, _, payload = data.partition(b"\n")
    offset, epoch, ts_us, origin = header.split(b" ", 3)
    # An event's header carries "-" for its (absent) epoch: events have none, as in memory.
    return Publication(
        room, payload, int(offset), "" if epoch == b"-" else epoch.decode(), origin.decode(),
        int(ts_us),
    )


def event_frame(payload: bytes, origin: str) -> bytes:
    return b"0 - %d %s\n" % (clock.now_us(), origin.encode()) + payload


class RedisBroker:
    """Broker over one Redis: pub/sub for fan-out, streams for history."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, config: Config,
        pubsub_client: aioredis.Redis | None = None,
    ) -> None:
        self._redis = redis
        # The reader's own client (see redis_common.connect): a lost pub/sub connection must
        # surface here, so that the resubscribe goes through the node's refill.
        self._pubsub_client = pubsub_client or redis
        self._keys = keys
        self._history_size = config.history_size
        self._history_ttl_ms = int(config.history_ttl * 1000)
        self._subscribe_timeout = config.redis_timeout
        self._backoff_cap = config.redis_retry_max
        self._publish_script = redis.register_script(load_script("publish"))
        self._rooms: set[str] = set()
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._on_publication: OnPublication | None = None
        self._on_resubscribed: OnResubscribed | None = None

    @property
    def available(self) -> bool:
        return self._connected.is_set()

    async def start(
        self, on_publication: OnPublication, on_resubscribed: OnResubscribed | None = None
    ) -> None:
        self._on_publication = on_publication
        self._on_resubscribed = on_resubscribed
        self._reader = asyncio.create_task(self._read_forever(), name="redis-pubsub-reader")

    async def wait_connected(self, within: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), within)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._connected.clear()
        for client in {id(self._redis): self._redis,
                       id(self._pubsub_client): self._pubsub_client}.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    # --- subscriptions ----------------------------------------------------------------------

    @unavailable_on_redis_error
    async def subscribe(self, room: str) -> None:
        self._rooms.add(room)
        if not self._connected.is_set() or self._pubsub is None:
            # The reader subscribes every room when it (re)connects; the caller must not think
            # it will get live messages before then.
            raise BrokerUnavailable("redis is unavailable")
        channel = self._keys.channel(room)
        waiter = self._pending.get(channel)
        if waiter is None or waiter.done():
            waiter = self._pending[channel] = asyncio.get_running_loop().create_future()
            await self._pubsub.subscribe(channel)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._subscribe_timeout)
        except TimeoutError:
            raise BrokerUnavailable("redis did not confirm the subscription") from None

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)
        self._pending.pop(self._keys.channel(room), None)
        if self._pubsub is not None and self._connected.is_set():
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(self._keys.channel(room))

    async def _read_forever(self) -> None:
        backoff = BACKOFF_BASE
        first = True
        while True:
            pubsub = self._pubsub_client.pubsub()
            try:
                rooms = list(self._rooms)
                # A control channel keeps the connection in subscribed mode with no rooms.
                await pubsub.subscribe(
                    self._keys.control(), *(self._keys.channel(room) for room in rooms))
                self._pubsub = pubsub
                await self._read(pubsub, rooms, resubscribed=not first)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._connected.is_set():
                    log.warning("redis connection lost", error=str(exc))
                    backoff = BACKOFF_BASE
                else:
                    log.warning("redis unreachable", error=str(exc), retry_in=round(backoff, 2))
            finally:
                self._connected.clear()
                self._pubsub = None
                for waiter in self._pending.values():
                    if not waiter.done():
                        waiter.set_exception(BrokerUnavailable("redis connection lost"))
                        waiter.exception()  # Mark retrieved: nobody may be waiting any more.
                self._pending.clear()
                with contextlib.suppress(RedisError, OSError, RuntimeError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
            first = False
            # Full jitter (AWS architecture blog): spreads a cluster's reconnects to Redis.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, self._backoff_cap)

    async def _read(self, pubsub: Any, rooms: list[str], resubscribed: bool) -> None:
        control = self._keys.control()
        room_of = self._keys.room_of_channel
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            channel = as_str(message["channel"])
            if kind == "message":
                if self._on_publication is not None:
                    self._on_publication(parse_frame(room_of(channel), message["data"]))
            elif kind == "subscribe":
                if not self._connected.is_set() and channel == control:
                    self._connected.set()
                    log.info("redis pubsub connected", rooms=len(rooms))
                    if resubscribed and rooms and self._on_resubscribed is not None:
                        self._on_resubscribed(rooms)
                waiter = self._pending.pop(channel, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    # --- publishing -------------------------------------------------------------------------

    @unavailable_on_redis_error
    async def publish(self, room: str, prefix: bytes, origin: str) -> Publication:
        if not self._connected.is_set():
            raise BrokerUnavailable("redis is unavailable")
        offset, epoch = await self._publish_script(
            keys=[self._keys.meta(room), self._keys.stream(room)],
            args=[
                self._keys.channel(room), prefix, origin, self._history_size,
                self._history_ttl_ms, new_epoch(), clock.now_us(),
            ],
        )
        epoch = as_str(epoch)
        return Publication(room, finish_message(prefix, int(offset), epoch), int(offset), epoch,
                           origin)

    @unavailable_on_redis_error
    async def publish_event(self, room: str, payload: bytes, origin: str = "") -> None:
        if not self._connected.is_set():
            raise BrokerUnavailable("redis is unavailable")
        await self._redis.publish(self._keys.channel(room), event_frame(payload, origin))
