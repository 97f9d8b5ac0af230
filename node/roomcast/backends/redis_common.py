"""What the Redis backends share: the client built from the Config, the Lua loader, and the one
mapping of Redis failures to BrokerUnavailable."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from roomcast.backends.broker import BrokerUnavailable
from roomcast.config import Config

#: Seconds a pooled connection may sit idle before redis-py PINGs it on next use. A constant:
#: it only turns a half-open socket into an error a little sooner; --redis-timeout bounds waits.
HEALTH_CHECK_INTERVAL = 10

P = ParamSpec("P")
T = TypeVar("T")


def connect(config: Config, retries: int = 1, role: str = "commands") -> aioredis.Redis:
    """A client of the node's Redis with its own connection pool.

    The command client (shared by broker, history and presence) retries once on a fresh
    connection: that absorbs a pooled socket left stale by a Redis restart; anything longer is the
    pub/sub reader's backoff loop, so that an outage shows as one. The pub/sub client takes
    ``retries=0``: redis-py would otherwise reconnect a lost pub/sub connection silently and
    resubscribe, and whatever was published in between would never be refilled (recovery.py).
    Connections are named ``roomcast:<node_id>:<role>`` (CLIENT LIST shows whose they are).
    """
    assert config.redis_url is not None
    return aioredis.Redis.from_url(
        config.redis_url,
        socket_connect_timeout=config.redis_connect_timeout,
        socket_timeout=config.redis_timeout,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=Retry(NoBackoff(), retries),
        client_name=f"roomcast:{config.node_id}:{role}",
    )


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
    """The text of ``roomcast/backends/lua/<name>.lua``."""
    return resources.files("roomcast.backends").joinpath("lua", f"{name}.lua").read_text()


def as_str(raw: Any) -> str:
    """A Redis reply item as text (replies are bytes: the client does not decode)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)
