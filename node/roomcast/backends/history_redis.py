"""RedisHistory: a room's offsets and stored messages in Redis (layout in keys.py).

Per room a meta hash (``offset``, ``epoch``) and a stream whose entry IDs are ``<offset>-0``,
both written by lua/publish.lua as it publishes. Reading runs lua/history.lua, which takes the
position and the entries in one consistent snapshot.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from roomcast.backends.history import HistoryResult, new_epoch, recovery_result
from roomcast.backends.keys import Keys, shard
from roomcast.backends.redis_batch import Batcher
from roomcast.backends.redis_common import as_str, load_script, unavailable_on_redis_error
from roomcast.protocol.envelopes import Since


class RedisHistory:
    """Reads history that lua/publish.lua writes (and keeps for --history-ttl). A room only read,
    never published to, keeps its meta key (its epoch) for ``idle_ttl`` after each read."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, idle_ttl: float = 300.0,
                 shards: list[aioredis.Redis] | None = None) -> None:
        #: One client, or each shard's (client-side sharding: a room's history is on its
        #: shard, keys.shard).
        self._clients = shards or [redis]
        self._keys = keys
        self._idle_ttl_ms = max(1, int(idle_ttl * 1000))
        self._scripts = [client.register_script(load_script("history"))
                         for client in self._clients]
        #: Reads of concurrent joins go as one pipeline per round trip (redis_batch.py).
        self._batches = [Batcher.for_backend(client) for client in self._clients]
        self._restarts = [client.register_script(load_script("restart_epoch"))
                          for client in self._clients]

    def _shard(self, room: str) -> int:
        return shard(room, len(self._clients))

    async def close(self) -> None:
        """Close the batchers and their connections (the clients are the broker's to close)."""
        for batch in self._batches:
            await batch.close()

    @unavailable_on_redis_error
    async def restart_epoch(self, room: str, epoch: str) -> str:
        reply = await self._restarts[self._shard(room)](
            keys=[self._keys.meta(room), self._keys.stream(room)], args=[epoch, new_epoch()])
        return as_str(reply)

    @unavailable_on_redis_error
    async def read(
        self, room: str, since: Since | None = None, limit: int | None = None
    ) -> HistoryResult:
        start = "-" if since is None else str(since.offset + 1)
        # A room never published to (or whose history was lost) gets an epoch in the same
        # script, kept for --idle-room-ttl, so that a position read now can be continued.
        index = self._shard(room)
        reply = await self._batches[index].script(
            self._scripts[index], [self._keys.meta(room), self._keys.stream(room)],
            [start, limit or 0, new_epoch(), self._idle_ttl_ms],
        )
        offset, epoch, first_offset = int(reply[0]), as_str(reply[1]), int(reply[2])
        return recovery_result(offset, epoch, first_offset, list(reply[3:]), since)
