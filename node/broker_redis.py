"""RedisBroker: publications travel between nodes over Redis pub/sub; history lives in streams.

One pub/sub connection per node. Every publish of a stored message runs lua/publish.lua, which
assigns the offset, appends to the stream and publishes in one atomic step. When Redis goes away
the reader logs it, retries with capped exponential backoff and jitter, and resubscribes every room
once Redis is back; publishes in between raise BrokerUnavailable (never a silent drop).

Pub/sub frame: ``b"<offset> <epoch> <ts_us> <origin>\\n" + envelope``; offset 0 = ephemeral event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from node.broker import (
    BrokerUnavailable,
    HistoryResult,
    OnPublication,
    Publication,
    new_epoch,
    now_us,
    recovery_result,
)
from node.keys import Keys
from node.protocol import Since, finish_message

log = structlog.get_logger("roomcast.broker")

SUBSCRIBE_TIMEOUT = 5.0
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0


P = ParamSpec("P")
T = TypeVar("T")


def unavailable_on_redis_error(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn Redis connection failures into BrokerUnavailable: clients get 'unavailable'."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable("redis is unavailable") from exc

    return wrapper


def load_script(name: str) -> str:
    """The text of ``node/lua/<name>.lua``."""
    return resources.files("node").joinpath("lua", f"{name}.lua").read_text()


def parse_frame(room: str, data: bytes) -> Publication:
    """Split a pub/sub frame into its header fields and the envelope bytes."""
    header, _, payload = data.partition(b"\n")
    offset, epoch, ts_us, origin = header.split(b" ", 3)
    return Publication(
        room, payload, int(offset), epoch.decode(), origin.decode(), int(ts_us)
    )


def as_str(raw: Any) -> str:
    """A Redis reply item as text (replies are bytes: the client does not decode)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def event_frame(payload: bytes, origin: str) -> bytes:
    return b"0 - %d %s\n" % (now_us(), origin.encode()) + payload


class RedisBroker:
    """Broker over one Redis: pub/sub for fan-out, streams for history."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        history_size: int = 100,
        history_ttl: float = 86400.0,
    ) -> None:
        self._url = url
        self._keys = keys
        self._history_size = history_size
        self._history_ttl_ms = int(history_ttl * 1000)
        # One retry on a fresh connection absorbs a pooled socket left stale by a Redis restart;
        # anything longer is the reader's backoff loop, so that an outage shows as one.
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=10,
            retry=Retry(NoBackoff(), 1),
        )
        self._publish_script = self._redis.register_script(load_script("publish"))
        self._history_script = self._redis.register_script(load_script("history"))
        self._rooms: set[str] = set()
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._on_publication: OnPublication | None = None

    @property
    def redis(self) -> aioredis.Redis:
        """The command client, shared with the Redis presence store."""
        return self._redis

    @property
    def available(self) -> bool:
        return self._connected.is_set()

    async def start(self, on_publication: OnPublication) -> None:
        self._on_publication = on_publication
        self._reader = asyncio.create_task(self._read_forever(), name="redis-pubsub-reader")

    async def wait_connected(self, within: float) -> bool:
        """Wait until the pub/sub connection is up; False on timeout."""
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
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()

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
            await asyncio.wait_for(asyncio.shield(waiter), SUBSCRIBE_TIMEOUT)
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
        while True:
            pubsub = self._redis.pubsub()
            try:
                channels = [self._keys.channel(room) for room in self._rooms]
                # A control channel keeps the connection in subscribed mode with no rooms.
                await pubsub.subscribe(f"{self._keys.prefix}:control", *channels)
                self._pubsub = pubsub
                await self._read(pubsub, resubscribed=len(channels))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._connected.is_set():
                    log.warning("redis connection lost", error=str(exc))
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
            # Full jitter (AWS architecture blog): spreads a cluster's reconnects to Redis.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, BACKOFF_CAP)

    async def _read(self, pubsub: Any, resubscribed: int) -> None:
        prefix_len = len(self._keys.prefix) + 5
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"].decode()
            if kind == "message":
                if self._on_publication is not None:
                    room = channel[prefix_len:-1]
                    self._on_publication(parse_frame(room, message["data"]))
            elif kind == "subscribe":
                if not self._connected.is_set() and channel.endswith(":control"):
                    self._connected.set()
                    log.info("redis pubsub connected", rooms=resubscribed)
                waiter = self._pending.pop(channel, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    # --- publishing and history --------------------------------------------------------------

    @unavailable_on_redis_error
    async def publish(self, room: str, prefix: bytes, origin: str) -> Publication:
        if not self._connected.is_set():
            raise BrokerUnavailable("redis is unavailable")
        offset, epoch = await self._publish_script(
            keys=[self._keys.meta(room), self._keys.stream(room)],
            args=[
                self._keys.channel(room), prefix, origin, self._history_size,
                self._history_ttl_ms, new_epoch(), now_us(),
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

    @unavailable_on_redis_error
    async def history(
        self, room: str, since: Since | None = None, limit: int | None = None
    ) -> HistoryResult:
        start = "-" if since is None else str(since.offset + 1)
        reply = await self._history_script(
            keys=[self._keys.meta(room), self._keys.stream(room)],
            args=[start, limit or 0],
        )
        offset, epoch, first_offset = int(reply[0]), as_str(reply[1]), int(reply[2])
        if not epoch:
            # The room has never been published to (or its history was lost): give it an epoch
            # now so that a client can recover from this position later.
            epoch = await self._ensure_epoch(room)
        return recovery_result(offset, epoch, first_offset, list(reply[3:]), since)

    async def _ensure_epoch(self, room: str) -> str:
        await self._redis.hsetnx(self._keys.meta(room), "epoch", new_epoch())
        if self._history_ttl_ms:
            await self._redis.pexpire(self._keys.meta(room), self._history_ttl_ms)
        epoch = await self._redis.hget(self._keys.meta(room), "epoch")
        return as_str(epoch) if epoch else ""
