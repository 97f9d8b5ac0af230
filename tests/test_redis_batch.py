"""Auto-pipelining (backends/redis_batch.py) against a real redis-server: concurrent callers get
their own replies and errors in call order, a closed batcher fails what it holds instead of
leaving callers waiting, and a NOSCRIPT rerun that fails fails only the commands it reran."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from roomcast.backends.redis_batch import Batcher
from tests.harness import RedisServer

#: Increments a key and returns its new value (KEYS[1]).
INCR_SCRIPT = "return redis.call('INCR', KEYS[1])"


async def test_concurrent_calls_get_their_own_replies_in_call_order(
    redis_client: aioredis.Redis,
) -> None:
    """200 INCRs issued at once (most of them while the first pipeline is in flight) come back
    1..200 in the order they were called; a command Redis refuses in the middle (INCR of a
    list) fails alone, and its neighbours run."""
    await redis_client.rpush("a-list", "x")
    batcher = Batcher(redis_client)
    calls = [batcher.call("INCR", "n") for _ in range(100)]
    refused = batcher.call("INCR", "a-list")
    calls += [batcher.call("INCR", "n") for _ in range(100)]
    assert await asyncio.gather(*calls) == list(range(1, 201))
    with pytest.raises(ResponseError):
        await refused
    assert int(await redis_client.get("n")) == 200


async def test_close_fails_what_is_queued_and_what_comes_later_and_sends_nothing(
    redis_client: aioredis.Redis,
) -> None:
    """Commands queued when the batcher closes (its sender not even started) and commands
    issued after it closed fail with a ConnectionError, a Redis failure that callers answer
    'unavailable' or retry; none of them reaches Redis."""
    batcher = Batcher(redis_client)
    queued = [batcher.call("INCR", "closed") for _ in range(3)]
    await batcher.close()
    later = batcher.call("INCR", "closed")
    for future in [*queued, later]:
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(future, 5)
    assert await redis_client.get("closed") is None


async def test_scripts_flushed_from_redis_are_loaded_and_run_again(
    redis_client: aioredis.Redis,
) -> None:
    """After SCRIPT FLUSH (a Redis restart loses scripts too) a batch of script runs gets
    NOSCRIPT, loads the script and runs them again: every caller gets its reply, once."""
    script = redis_client.register_script(INCR_SCRIPT)
    batcher = Batcher(redis_client)
    assert await batcher.script(script, ["s"], []) == 1
    await redis_client.script_flush()
    replies = await asyncio.gather(*(batcher.script(script, ["s"], []) for _ in range(20)))
    assert replies == list(range(2, 22))


async def test_a_failed_script_reload_fails_only_the_commands_it_would_have_rerun(
    redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """A client allowed EVALSHA and INCR but not SCRIPT LOAD (an ACL) sends a batch after the
    scripts were flushed: the script run fails (it could not be reloaded), while the INCR of
    the same batch, which ran, gets its reply."""
    await redis_client.execute_command(
        "ACL", "SETUSER", "batch", "on", ">pw", "~*", "+incr", "+evalsha", "+ping")
    limited = aioredis.Redis.from_url(
        f"redis://batch:pw@127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    try:
        script = limited.register_script(INCR_SCRIPT)
        batcher = Batcher(limited)
        ran = batcher.call("INCR", "plain")
        rerun = batcher.script(script, ["scripted"], [])
        assert await ran == 1
        with pytest.raises(ResponseError):
            await rerun
        assert await redis_client.get("scripted") is None
        assert await redis_client.get("plain") == b"1"
    finally:
        await limited.aclose()
