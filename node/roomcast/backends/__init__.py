"""Backends: the three seams a node stores and shares state through, each a ``typing.Protocol``
with its memory implementation beside it and its Redis one next to that.

* broker   (broker.py, broker_redis.py):     publications to every node with members of a room.
* history  (history.py, history_redis.py):   a room's offsets, epoch and stored messages.
* presence (presence.py, presence_redis.py): who is in each room, user_joined/user_left.

``build`` chooses them in one place: no Redis URL, memory; a URL, Redis. tests/contract/ runs one
suite per seam against both implementations. A Redis broker carries the node's ``health``
(redis_common.RedisHealth: readiness and failure counts); a memory broker has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from roomcast.backends.broker import Broker, MemoryBroker
from roomcast.backends.history import History, MemoryHistory
from roomcast.backends.presence import MemoryPresence, PresenceStore
from roomcast.config import Config
from roomcast.namespaces import Namespaces, default_namespace


@dataclass(frozen=True, slots=True)
class Backends:
    broker: Broker
    history: History
    presence: PresenceStore


def build(config: Config, namespaces: Namespaces | None = None) -> Backends:
    """Memory backends for a lone node, Redis ones when ``config.redis_url`` is set; a room's
    history keeps as many messages for as long as its namespace says."""
    retention = (namespaces or Namespaces(default_namespace(config))).retention
    if config.redis_url is None:
        history = MemoryHistory(config.history_size, config.history_ttl,
                                idle_ttl=config.idle_room_ttl, retention=retention)
        return Backends(
            MemoryBroker(history),
            history,
            MemoryPresence(config.node_id, config.presence_grace),
        )
    # Imported only in cluster mode: an embedded node never loads redis-py.
    from roomcast.backends.broker_redis import RedisBroker
    from roomcast.backends.history_redis import RedisHistory
    from roomcast.backends.keys import Keys
    from roomcast.backends.presence_redis import RedisPresence
    from roomcast.backends.redis_common import RedisHealth, connect, connect_cluster

    # --redis-cluster: rooms in partitions (hash tags, sharded channels), Redis Cluster clients.
    keys = Keys(config.redis_prefix, config.redis_partitions if config.redis_cluster else 0)
    health = RedisHealth()
    # One pool for commands (broker, history, presence), sized by --redis-pool-size; the
    # pub/sub reader and the health probe have small pools of their own, so that neither waits
    # behind a burst of commands.
    client: Any = connect_cluster if config.redis_cluster else connect
    # Client-side sharding (several URLs): the same three clients per shard; the first
    # shard's also serve presence and node state.
    shards = [
        (client(config, health=health, url=url),
         client(config, retries=0, role="pubsub", pool_size=2, url=url),
         client(config, retries=0, role="health", pool_size=2, url=url))
        for url in config.redis_urls  # One with --redis-cluster (its seed node).
    ]
    redis, pubsub, probe = shards[0]
    sharded = shards if len(shards) > 1 else None
    return Backends(
        RedisBroker(redis, keys, config, pubsub_client=pubsub, probe_client=probe,
                    health=health, retention=retention, shards=sharded),
        RedisHistory(redis, keys, config.idle_room_ttl,
                     shards=[commands for commands, _, _ in shards] if sharded else None),
        RedisPresence(redis, keys, config.node_id, config.presence_grace,
                      config.node_lease_ttl, room_ttl=config.idle_room_ttl),
    )
