"""Backends: the three seams a node stores and shares state through, each a ``typing.Protocol``
with its memory implementation beside it and its Redis one next to that.

* broker   (broker.py, broker_redis.py):     publications to every node with members of a room.
* history  (history.py, history_redis.py):   a room's offsets, epoch and stored messages.
* presence (presence.py, presence_redis.py): who is in each room, user_joined/user_left.

``build`` chooses them in one place: no Redis URL, memory; a URL, Redis. tests/contract/ runs one
suite per seam against both implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

from roomcast.backends.broker import Broker, MemoryBroker
from roomcast.backends.history import History, MemoryHistory
from roomcast.backends.presence import MemoryPresence, PresenceStore
from roomcast.config import Config


@dataclass(frozen=True, slots=True)
class Backends:
    broker: Broker
    history: History
    presence: PresenceStore


def build(config: Config) -> Backends:
    """Memory backends for a lone node, Redis ones when ``config.redis_url`` is set."""
    if config.redis_url is None:
        history = MemoryHistory(config.history_size, config.history_ttl,
                                idle_ttl=config.idle_room_ttl)
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
    from roomcast.backends.redis_common import connect

    keys = Keys(config.redis_prefix)
    redis = connect(config)
    return Backends(
        RedisBroker(redis, keys, config, pubsub_client=connect(config, retries=0,
                                                                    role="pubsub")),
        RedisHistory(redis, keys, config.history_ttl),
        RedisPresence(redis, keys, config.node_id, config.presence_grace,
                      config.node_lease_ttl),
    )
