"""Fixtures that start real redis-server and node processes and always stop them by PID."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from tests.harness import NodeProcess, RedisServer, running_redis
from tests.rediscluster import RedisCluster, running_cluster


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture
def start_node() -> Iterator[Callable[..., NodeProcess]]:
    """Factory: start_node(redis_url=None, *flags, env=..., faults=[...]) -> a started
    NodeProcess (``faults``: names from tests/faults.py, injected from the harness side)."""
    nodes: list[NodeProcess] = []

    def start(redis_url: str | None = None, *args: str, **kwargs: object) -> NodeProcess:
        node = NodeProcess(redis_url, *args, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node.start()

    yield start
    for node in nodes:
        node.kill()


@pytest.fixture
def node(start_node: Callable[..., NodeProcess]) -> NodeProcess:
    """One node in embedded mode (no Redis), short presence grace for fast tests."""
    return start_node(None, "--presence-grace", "0.3", "--rate-burst", "500")


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client of the test's redis-server, closed afterwards."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    """Three masters, no replica, shared by a module's tests: a test that kills or pauses a
    master leaves the cluster down for the next ones (use redis_cluster_with_replicas)."""
    with running_cluster(masters=3, replicas=0) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_with_replicas() -> Iterator[RedisCluster]:
    """Three masters with one replica each, for one test: kill_master and wait_failover."""
    with running_cluster(masters=3, replicas=1) as cluster:
        yield cluster
