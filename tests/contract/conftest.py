"""The ``backend`` fixture: every contract test runs once on memory and once on Redis.

No Redis URL gives the memory versions, a URL the Redis ones (as ``roomcast.backends.build``
chooses). One redis-server serves the whole session; each test gets a key prefix of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.contract.factories import Backend, MemoryBackend, RedisBackend
from tests.harness import RedisServer, running_redis


@pytest.fixture(scope="session")
def contract_redis() -> Iterator[RedisServer]:
    """One real redis-server for every contract test (isolated by key prefix)."""
    with running_redis() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    """None for the memory run; the shared server's URL for the Redis run."""
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("contract_redis")
    return server.url


@pytest.fixture
async def backend(redis_url: str | None) -> AsyncIterator[Backend]:
    """The factories of one implementation; closes all it built at teardown."""
    built: Backend = MemoryBackend() if redis_url is None else RedisBackend(redis_url)
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
