"""RedisHistory: a room's offsets and stored messages in Redis (layout in keys.py).

Per room a meta hash (``offset``, ``epoch``) and a stream whose entry IDs are ``<offset>-0``,
both written by lua/publish.lua as it publishes. Reading runs lua/history.lua, which takes the
position and the entries in one consistent snapshot.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from roomcast.backends.history import HistoryResult, new_epoch, recovery_result
from roomcast.backends.keys import Keys
from roomcast.backends.redis_common import as_str, load_script, unavailable_on_redis_error
from roomcast.protocol.envelopes import Since


class RedisHistory:
    """Reads history that lua/publish.lua writes (and keeps for --history-ttl). A room only read,
    never published to, keeps its meta key (its epoch) for ``idle_ttl`` after each read."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, idle_ttl: float = 300.0) -> None:
        self._redis = redis
        self._keys = keys
        self._idle_ttl_ms = max(1, int(idle_ttl * 1000))
        self._script = redis.register_script(load_script("history"))
        self._restart = redis.register_script(load_script("restart_epoch"))

    @unavailable_on_redis_error
    async def restart_epoch(self, room: str, epoch: str, delivered: int,
                            force: bool = False) -> str:
        reply = await self._restart(
            keys=[self._keys.meta(room), self._keys.stream(room)],
            args=[epoch, delivered, new_epoch(), int(force)])
        return as_str(reply)

    @unavailable_on_redis_error
    async def read(
        self, room: str, since: Since | None = None, limit: int | None = None
    ) -> HistoryResult:
        start = "-" if since is None else str(since.offset + 1)
        reply = await self._script(
            keys=[self._keys.meta(room), self._keys.stream(room)], args=[start, limit or 0],
        )
        offset, epoch, first_offset = int(reply[0]), as_str(reply[1]), int(reply[2])
        if offset == 0:
            # The room has never been published to (or its history was lost): give it an epoch
            # now so that a client can recover from this position later, for --idle-room-ttl.
            epoch = await self._keep_idle(room)
        return recovery_result(offset, epoch, first_offset, list(reply[3:]), since)

    async def _keep_idle(self, room: str) -> str:
        meta = self._keys.meta(room)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(meta, "epoch", new_epoch())
            pipe.pexpire(meta, self._idle_ttl_ms)
            pipe.hget(meta, "epoch")
            replies = await pipe.execute()
        return as_str(replies[-1]) if replies[-1] else ""
