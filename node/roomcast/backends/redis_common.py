"""What the Redis backends share: the clients built from the Config, the Lua loader, the one
mapping of Redis failures to BrokerUnavailable, and ``RedisHealth``, where every failure is
classified, counted and logged, and the write probe's verdict is kept for readiness."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Mapping
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    MaxConnectionsError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from roomcast import clock
from roomcast.backends.broker import BrokerUnavailable
from roomcast.config import Config

log = structlog.get_logger("roomcast.redis")

#: Seconds a pooled connection may sit idle before redis-py PINGs it on next use. A constant:
#: it only turns a half-open socket into an error a little sooner; --redis-timeout bounds waits.
HEALTH_CHECK_INTERVAL = 10

#: What every connection tells Redis it is (CLIENT SETINFO: lib-name redis-py, lib-ver its
#: version), made once. Without it redis-py 8.1 reads its package metadata from disk for each
#: new connection (importlib.metadata: 0.60 ms of CPU per make_connection, 0.026 with this),
#: and a join storm that grows the pools, or a batcher's reconnect, pays it for every one.
DRIVER_INFO = DriverInfo()

#: The kinds of Redis failure: the ``kind`` label of roomcast_redis_errors_total and of the
#: ``redis command failed`` log line (docs/RUNBOOK.md, section 8).
ERROR_KINDS = ("connection", "timeout", "pool", "oom", "readonly", "misconf", "other")
#: Kinds in which Redis answers but refuses to write: a request that sees one marks the node not
#: ready at once, without waiting for the next probe (the probe, a write, says when it is over).
WRITE_REFUSALS = frozenset({"oom", "readonly", "misconf"})
#: The readiness reason (/readyz ``redis``) for a probe that failed with each kind.
REASONS = {"connection": "unreachable", "timeout": "timeout", "pool": "timeout", "oom": "oom",
           "readonly": "readonly", "misconf": "misconf", "other": "error"}
#: Seconds between two ``redis command failed`` lines of one kind: an outage logs its first
#: failure at once, then one line per this many seconds with the count, not one per request.
WARN_EVERY = 10.0
#: What redis-py 8.1's BlockingConnectionPool raises (a ConnectionError) when no connection
#: came free within its timeout (redis/asyncio/connection.py, get_connection).
POOL_TIMEOUT_MESSAGE = "No connection available."
#: What redis-py 8.1 puts between a pipeline's command and the error it caused
#: (Pipeline.annotate_exception).
PIPELINE_ERROR_MARK = " of pipeline caused error: "

#: What a Redis command can fail with: redis-py's errors, the OS's, and the Redis Cluster
#: client's own (RedisClusterException, raised when no node of the cluster answers, is not a
#: RedisError).
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)

P = ParamSpec("P")
T = TypeVar("T")


def classify(exc: BaseException) -> str | None:
    """The kind (one of ERROR_KINDS) of a Redis failure; None for what is not a failure.

    NOSCRIPT is not one: redis-py's Script loads the script and retries on it by itself.
    """
    if isinstance(exc, NoScriptError):
        return None
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, MaxConnectionsError) or (
        isinstance(exc, RedisConnectionError) and str(exc) == POOL_TIMEOUT_MESSAGE
    ):
        return "pool"
    if isinstance(exc, RedisConnectionError | OSError | RedisClusterException):
        return "connection"
    if isinstance(exc, ResponseError):
        # A reply's code is the first word of its message unless redis-py mapped it to a
        # subclass (and dropped it); in a pipeline redis-py puts "Command # n (...) of pipeline
        # caused error: " and the repr of the original arguments in front.
        message = str(exc)
        message = message.partition(PIPELINE_ERROR_MARK)[2].lstrip("(\"'") or message
        if isinstance(exc, OutOfMemoryError) or message.startswith("OOM"):
            return "oom"
        if isinstance(exc, ReadOnlyError) or message.startswith("READONLY"):
            return "readonly"
        if message.startswith("MISCONF"):
            return "misconf"
    return "other"


class RedisHealth:
    """What a node knows of its Redis: every failure seen, and whether it accepts writes now.

    ``failed`` classifies a failure, counts it by kind (``errors``, exposed as a metric) and logs
    ``redis command failed`` at WARNING: a kind's first failure at once, later ones at most once
    per ``warn_every`` seconds with how many there were (``flush`` writes a pending count once
    its time has come, even if the failures stopped). ``probed`` takes the outcome of the
    broker's write probe. ``problem()`` is the readiness verdict: None when Redis is reachable
    and writable, otherwise the reason (unreachable, timeout, oom, readonly, misconf, error).
    """

    def __init__(self, warn_every: float = WARN_EVERY, now: clock.Clock = clock.monotonic) -> None:
        self._warn_every = warn_every
        self._now = now
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        #: kind -> (failures not yet logged, the latest one's op, exception type and text).
        self._pending: dict[str, tuple[int, str, str, str]] = {}
        self._last_line: dict[str, float] = {}
        self._problem: str | None = None
        self._problem_since = 0.0
        self._connected: Callable[[], bool] = lambda: True

    def watch_connection(self, connected: Callable[[], bool]) -> None:
        """``connected()`` False (the pub/sub reader is not connected) means 'unreachable'."""
        self._connected = connected

    def errors(self) -> Mapping[str, int]:
        """Failures seen so far, by kind (every kind present, from 0)."""
        return dict(self._errors)

    def problem(self) -> str | None:
        if not self._connected():
            return "unreachable"
        return self._problem

    def failed(self, exc: BaseException, op: str) -> str | None:
        """Record one failure of ``op`` (a command name, ``probe`` or ``pubsub``); returns its
        kind, or None when it was not a failure (NOSCRIPT)."""
        kind = classify(exc)
        if kind is None:
            return None
        self._errors[kind] += 1
        count = self._pending.get(kind, (0, "", "", ""))[0] + 1
        self._pending[kind] = (count, op, type(exc).__name__, str(exc))
        if self._now() - self._last_line.get(kind, -self._warn_every) >= self._warn_every:
            self._log(kind)
        if kind in WRITE_REFUSALS:
            self._set_problem(kind)
        return kind

    def probed(self, exc: BaseException | None) -> None:
        """The write probe succeeded (``exc`` None) or failed with ``exc``."""
        if exc is None:
            self._set_problem(None)
            return
        kind = self.failed(exc, "probe")
        self._set_problem(REASONS[kind or "other"])

    def flush(self) -> None:
        """Log the pending count of every kind whose quiet interval has passed."""
        now = self._now()
        for kind in list(self._pending):
            if now - self._last_line.get(kind, -self._warn_every) >= self._warn_every:
                self._log(kind)

    def _log(self, kind: str) -> None:
        count, op, error_type, error = self._pending.pop(kind)
        self._last_line[kind] = self._now()
        log.warning("redis command failed", kind=kind, op=op, error_type=error_type, error=error,
                    count=count, every=self._warn_every)

    def _set_problem(self, problem: str | None) -> None:
        if problem == self._problem:
            return
        now = self._now()
        if problem is None:
            log.info("redis ready again", was=self._problem,
                     seconds=round(now - self._problem_since, 1))
        else:
            log.warning("redis not ready", reason=problem)
        self._problem, self._problem_since = problem, now


def _report(health: RedisHealth | None, exc: BaseException, args: tuple[Any, ...]) -> None:
    """A command client's failed command, reported under its command name."""
    if health is not None:
        health.failed(exc, as_str(args[0]).upper() if args else "?")


class _ObservedPipeline(Pipeline):
    """A pipeline of the command client: a failed execute is reported to its RedisHealth."""

    health: RedisHealth | None = None

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error)
        except REDIS_FAILURES as exc:
            if self.health is not None:
                self.health.failed(exc, "MULTI" if self.is_transaction else "PIPELINE")
            raise


class _ObservedRedis(aioredis.Redis):
    """The command client: every failed command (scripts included: EVALSHA) and pipeline is
    reported to the node's RedisHealth, whichever backend sent it."""

    health: RedisHealth | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(  # type: ignore[no-untyped-call]  # unannotated in redis-py
                *args, **options)
        except REDIS_FAILURES as exc:
            _report(self.health, exc, args)
            raise

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = _ObservedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.health = self.health
        return pipe


class _ObservedClusterPipeline(ClusterPipeline):
    """A pipeline of the Redis Cluster command client, reported like _ObservedPipeline."""

    health: RedisHealth | None = None

    async def execute(self, raise_on_error: bool = True,
                      allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except REDIS_FAILURES as exc:
            if self.health is not None:
                self.health.failed(exc, "PIPELINE")
            raise


class _ObservedRedisCluster(RedisCluster):
    """The command client over a Redis Cluster (--redis-cluster), reported like
    _ObservedRedis: redis-py routes each command to its slot's master."""

    health: RedisHealth | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except REDIS_FAILURES as exc:
            _report(self.health, exc, args)
            raise

    def pipeline(self, transaction: Any | None = None,
                 shard_hint: Any | None = None) -> ClusterPipeline:
        pipe = _ObservedClusterPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py does
        pipe.health = self.health
        return pipe


def _settings(config: Config, retries: int, role: str, pool_size: int | None,
              retry_on: tuple[type[RedisError], ...] | None = None) -> dict[str, Any]:
    """What every Redis client of the node is made with (see connect); ``retry_on``: the
    errors its retries are for (default: redis-py's, connection errors and timeouts)."""
    retry = (Retry(NoBackoff(), retries) if retry_on is None
             else Retry(NoBackoff(), retries, supported_errors=retry_on))
    return {
        "max_connections": pool_size or config.redis_pool_size,
        "socket_connect_timeout": config.redis_connect_timeout,
        "socket_timeout": config.redis_timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": retry,
        "client_name": f"roomcast:{config.node_id}:{role}",
        "driver_info": DRIVER_INFO,
    }


def connect_cluster(
    config: Config, retries: int = 1, role: str = "commands", pool_size: int | None = None,
    health: RedisHealth | None = None, url: str | None = None,
) -> RedisCluster:
    """A Redis Cluster client (--redis-cluster) from the seed node of --redis-url, with the
    settings of ``connect``; each master gets a pool of at most ``pool_size`` connections."""
    assert config.redis_url is not None
    client = _ObservedRedisCluster.from_url(
        url or config.redis_urls[0], **_settings(config, retries, role, pool_size))
    assert isinstance(client, _ObservedRedisCluster)
    client.health = health
    return client


def connect(
    config: Config, retries: int = 1, role: str = "commands", pool_size: int | None = None,
    health: RedisHealth | None = None, url: str | None = None,
) -> aioredis.Redis:
    """A client of the node's Redis with its own bounded connection pool.

    The pool (redis-py's BlockingConnectionPool) holds at most ``pool_size`` connections
    (default --redis-pool-size); a command that finds them all busy waits up to
    --redis-timeout for one instead of failing at once, so a burst of requests queues for
    Redis rather than getting 'unavailable'. The command client (shared by broker, history and
    presence) retries once on a fresh connection after a ConnectionError: that absorbs a pooled
    socket left stale by a Redis restart; anything longer is the pub/sub reader's backoff loop,
    so that an outage shows as one. A timeout is not retried: the command (or a whole pipeline,
    redis_batch.py) may have run, and sending it again would run it twice. The pub/sub client
    takes ``retries=0``: redis-py would otherwise reconnect a lost pub/sub connection silently
    and resubscribe, and whatever was published in between would never be refilled
    (recovery.py). Connections are named ``roomcast:<node_id>:<role>``
    (CLIENT LIST shows whose they are). With ``health``, every failed command is reported there.
    ``url`` is one shard's of several (client-side sharding); default: the one --redis-url.
    """
    assert config.redis_url is not None
    pool = aioredis.BlockingConnectionPool.from_url(
        url or config.redis_urls[0], timeout=config.redis_timeout,
        **_settings(config, retries, role, pool_size, retry_on=(RedisConnectionError,)))
    client = _ObservedRedis.from_pool(pool)  # The client owns the pool: aclose() closes both.
    assert isinstance(client, _ObservedRedis)
    client.health = health
    return client


def unavailable_on_redis_error(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn Redis failures into BrokerUnavailable: clients get 'unavailable'. (The command
    client has already reported the failure to RedisHealth: counted, logged.)"""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except REDIS_FAILURES as exc:
            raise BrokerUnavailable("redis is unavailable") from exc

    return wrapper


def load_script(name: str) -> str:
    """The text of ``roomcast/backends/lua/<name>.lua``."""
    return resources.files("roomcast.backends").joinpath("lua", f"{name}.lua").read_text()


def as_str(raw: Any) -> str:
    """A Redis reply item as text (replies are bytes: the client does not decode)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)

