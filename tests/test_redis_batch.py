"""Auto-pipelining (backends/redis_batch.py) against a real redis-server: concurrent callers get
their own replies and errors in call order, a closed batcher fails what it holds instead of
leaving callers waiting, and a NOSCRIPT rerun that fails fails only the commands it reran."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ExecAbortError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from roomcast import backends
from roomcast.backends.redis_batch import Batcher
from roomcast.config import Config
from tests.harness import RedisServer, wait_for
from tests.tcpproxy import FreezingProxy

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


async def test_a_transaction_refused_as_queued_runs_nothing_and_says_why(
    redis_client: aioredis.Redis,
) -> None:
    """A MULTI/EXEC batch (the publish queue's kind) with a command Redis refuses as it is
    queued (wrong arity) runs none of them: that command gets its own error, the others the
    EXECABORT; a command that fails as it runs (INCR of a list) fails alone, in place."""
    batcher = Batcher(redis_client, transaction=True)
    calls = [batcher.call("INCR", "t"), batcher.call("INCR"), batcher.call("INCR", "t")]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(result, ResponseError) for result in results)
    assert isinstance(results[0], ExecAbortError) and isinstance(results[2], ExecAbortError)
    assert not isinstance(results[1], ExecAbortError)
    assert "wrong number of arguments" in str(results[1])
    assert await redis_client.get("t") is None
    await redis_client.rpush("t-list", "x")
    calls = [batcher.call("INCR", "t"), batcher.call("INCR", "t-list"), batcher.call("INCR", "t")]
    first, refused, last = await asyncio.gather(*calls, return_exceptions=True)
    assert (first, last) == (1, 2)
    assert isinstance(refused, ResponseError) and "WRONGTYPE" in str(refused)


async def test_a_batch_after_a_redis_restart_is_sent_again_on_a_fresh_connection(
    redis_server: RedisServer,
) -> None:
    """The batcher's own connection is left dead by a restart: its next batch fails on it with
    a ConnectionError and goes once more on a fresh connection, so the caller gets its reply
    and the command runs once."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        batcher = Batcher(client)
        assert await batcher.call("INCR", "r") == 1
        redis_server.kill()
        redis_server.start()
        assert await asyncio.wait_for(batcher.call("INCR", "r"), 10) == 1
        assert await client.get("r") == b"1"
        await batcher.close()
    finally:
        await client.aclose()


async def test_a_publish_batch_that_may_have_run_is_not_sent_again(
    redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """The publish queue's kind of batcher (MULTI/EXEC, resend off): its connection breaks
    after Redis ran the batch, the reply lost. The caller gets the ConnectionError (the node
    answers 'unavailable'); the batch is not sent a second time, so it ran once, and the next
    batch goes on a fresh connection."""
    proxy = await FreezingProxy(redis_server.port).start()
    client = aioredis.Redis(port=proxy.port, socket_timeout=5, client_name="publish-queue")
    try:
        batcher = Batcher(client, transaction=True, resend=False)
        assert await batcher.call("INCR", "p") == 1
        assert proxy.cut(b"publish-queue") == 1
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(batcher.call("INCR", "p"), 10)
        assert await redis_client.get("p") == b"2"  # It ran, once.
        assert await asyncio.wait_for(batcher.call("INCR", "p"), 10) == 3
        await batcher.close()
    finally:
        await client.aclose()
        await proxy.close()


async def test_a_publish_batch_after_a_redis_restart_goes_on_a_fresh_connection(
    redis_server: RedisServer,
) -> None:
    """With resend off, a connection that Redis closed while it was idle (a restart) is
    replaced before anything is written to it: the next batch runs, once."""
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        batcher = Batcher(client, transaction=True, resend=False)
        assert await batcher.call("INCR", "q") == 1
        redis_server.kill()
        redis_server.start()
        wire = batcher._wire
        assert wire is not None and wire._conn is not None
        reader = wire._conn._reader
        # Barrier: the node's event loop has seen the old Redis close the connection.
        await wait_for(lambda: reader is not None and reader.at_eof(), what="the close seen")
        assert await asyncio.wait_for(batcher.call("INCR", "q"), 10) == 1
        await batcher.close()
    finally:
        await client.aclose()


async def test_a_batch_that_timed_out_is_not_sent_again(redis_server: RedisServer) -> None:
    """Redis stalls (SIGSTOP) past the socket timeout: the batch fails with a timeout, and is
    not sent a second time (it may have run): once Redis goes on, it has run exactly once."""
    assert redis_server.proc is not None
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.5)
    try:
        batcher = Batcher(client)
        assert await batcher.call("INCR", "s") == 1
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(batcher.call("INCR", "s"), 10)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert await batcher.call("INCR", "s") == 3  # The stalled one ran once, then this.
        await batcher.close()
    finally:
        await client.aclose()


async def test_a_push_from_redis_is_not_taken_for_a_reply(redis_client: aioredis.Redis) -> None:
    """RESP3 pushes arrive between replies (here: client-side caching's invalidation, sent the
    moment another client changes a key this connection read): they are not replies, and the
    next caller still gets its own."""
    batcher = Batcher(redis_client)
    assert await batcher.call("CLIENT", "TRACKING", "ON") == b"OK"
    assert await batcher.call("GET", "tracked") is None
    await redis_client.set("tracked", "changed")  # Redis pushes the invalidation right away.
    assert await batcher.call("INCR", "after-push") == 1
    assert await batcher.call("INCR", "after-push") == 2
    await batcher.close()


async def test_a_refused_multi_gives_each_command_its_own_reply(
    redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """A client that may not run MULTI (an ACL): Redis ran each command of the batch at once,
    so each caller gets what its command did, not the refusal of the transaction."""
    await redis_client.execute_command(
        "ACL", "SETUSER", "nomulti", "on", ">pw", "~*", "+incr", "+ping", "+client", "+hello")
    limited = aioredis.Redis.from_url(
        f"redis://nomulti:pw@127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    try:
        batcher = Batcher(limited, transaction=True)
        assert await asyncio.gather(batcher.call("INCR", "m"), batcher.call("INCR", "m")) == [1, 2]
        assert await redis_client.get("m") == b"2"
        await batcher.close()
    finally:
        await limited.aclose()


async def test_an_argument_redis_cannot_take_fails_its_caller_alone(
    redis_client: aioredis.Redis,
) -> None:
    """A bool (redis-py refuses it too) fails the call that brought it, with redis-py's
    DataError, before anything is sent; the calls around it run."""
    batcher = Batcher(redis_client)
    before = batcher.call("INCR", "typed")
    refused = batcher.call("SET", "typed-flag", True)
    after = batcher.call("INCR", "typed")
    with pytest.raises(DataError):
        await refused
    assert (await before, await after) == (1, 2)
    assert await redis_client.get("typed-flag") is None
    assert await batcher.call("SET", "view", memoryview(b"bytes")) == b"OK"
    assert await redis_client.get("view") == b"bytes"
    await batcher.close()


async def test_a_redis_that_refuses_every_connection_is_tried_as_often_as_for_one_command(
) -> None:
    """A server that closes every connection at once (a Redis going down): a batch fails with
    a ConnectionError after as many connection attempts as redis-py makes for one command, its
    own retries; the batcher does not retry those again."""
    accepted = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # The node's retry rule (redis_common._settings): once more at once, no backoff.
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2,
                            retry=Retry(NoBackoff(), 1))
    try:
        with pytest.raises(RedisConnectionError):
            await client.execute_command("PING")
        alone, accepted = accepted, 0
        batcher = Batcher(client)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(batcher.call("PING"), 10)
        assert accepted == alone > 0
        await batcher.close()
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_closing_the_backends_closes_the_batchers_connections(
    redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """The history and presence batchers' own connections (outside the client's pool) are
    closed with the backends: nothing of the node stays connected to Redis."""
    config = Config(node_id="closing", redis_url=redis_server.url)
    built = backends.build(config)
    await built.history.read("room")  # Opens the history batcher's connection.
    assert await built.presence.open_connection("u", "c1", 5)  # And presence's.

    async def names() -> list[str]:
        clients = await redis_client.client_list()
        return [c["name"] for c in clients if c["name"].startswith("roomcast:closing:")]

    assert len(await names()) >= 2
    await built.presence.close()
    await built.history.close()
    await built.broker.close()


    async def gone() -> bool:  # Redis drops a client once it has read its close.
        return await names() == []

    await wait_for(gone, timeout=5, what="the node's connections closed")
