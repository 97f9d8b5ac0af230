"""The ``backend`` fixture: every contract test runs on memory, on Redis and on Redis Cluster.

No Redis URL gives the memory versions, a URL the Redis ones (as ``roomcast.backends.build``
chooses), a URL with --redis-cluster the Redis ones over a three-master Redis Cluster (rooms in
partitions, sharded pub/sub). One redis-server and one cluster serve the whole session; each
test gets a key prefix of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.contract.factories import Backend, MemoryBackend, RedisBackend
from tests.harness import RedisServer, running_redis
from tests.rediscluster import RedisCluster, running_cluster


@pytest.fixture(scope="session")
def contract_redis() -> Iterator[RedisServer]:
    """One real redis-server for every contract test (isolated by key prefix)."""
    with running_redis() as server:
        yield server


@pytest.fixture(scope="session")
def contract_redis_cluster() -> Iterator[RedisCluster]:
    """One real three-master Redis Cluster for every contract test (isolated by key prefix)."""
    with running_cluster(masters=3, replicas=0) as cluster:
        yield cluster


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def redis_url(backend_kind: str, request: pytest.FixtureRequest) -> str | None:
    """None for the memory run; the shared server's (or cluster seed's) URL otherwise."""
    if backend_kind == "memory":
        return None
    if backend_kind == "redis-cluster":
        cluster: RedisCluster = request.getfixturevalue("contract_redis_cluster")
        return cluster.seed_url
    server: RedisServer = request.getfixturevalue("contract_redis")
    return server.url


@pytest.fixture
async def backend(backend_kind: str, redis_url: str | None) -> AsyncIterator[Backend]:
    """The factories of one implementation; closes all it built at teardown."""
    built: Backend
    if redis_url is None:
        built = MemoryBackend()
    elif backend_kind == "redis-cluster":
        built = RedisBackend(redis_url, redis_cluster=True)
    else:
        built = RedisBackend(redis_url)
    try:
        yield built
    finally:
        await built.aclose()


@pytest.fixture
async def redis_backend(contract_redis: RedisServer) -> AsyncIterator[RedisBackend]:
    """Redis factories only, for the behaviour of several nodes sharing one Redis."""
    built = RedisBackend(contract_redis.url)
    try:
        yield built
    finally:
        await built.aclose()
