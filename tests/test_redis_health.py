"""What an operator sees when Redis is in trouble: /readyz names the reason, every failure is
counted by kind and logged (rate-limited), and a low pub/sub output-buffer limit is warned about.

Real redis-server and node processes on loopback; the in-process tests at the end drive
redis_common directly against a real redis-server. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import redis
import structlog

from roomcast.backends.broker import BrokerUnavailable
from roomcast.backends.history_redis import RedisHistory
from roomcast.backends.keys import Keys
from roomcast.backends.redis_common import RedisHealth, classify, connect
from roomcast.config import Config
from tests.harness import NodeProcess, RedisServer, native, running_redis, wait_for

#: Seconds within which readiness must follow Redis: the probe runs every second.
FOLLOWS = 5.0


def http(url: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a GET, 503s included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def redis_errors(node: NodeProcess) -> dict[str, float]:
    """roomcast_redis_errors_total by kind, from the node's /metrics."""
    with urllib.request.urlopen(f"{node.api}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {kind: float(value) for kind, value in re.findall(
        r'^roomcast_redis_errors_total\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def logged(node: NodeProcess, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [line for line in node.logged(event)
            if all(line.get(k) == v for k, v in fields.items())]


def extra_redis() -> contextlib.AbstractContextManager[RedisServer]:
    return running_redis()


async def test_out_of_memory_redis_refuses_publishes_and_readyz_says_oom_until_it_is_fixed(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Redis at maxmemory with noeviction: a publish gets 'unavailable', /readyz answers 503
    {"redis": "oom"} within seconds, /healthz stays 200, the WARNING line and the oom metric
    appear; with the memory limit lifted the node is ready again and publishes go through."""
    node = start_node(redis_server.url)
    alice = await native(node, "alice")
    assert (await alice.request({"type": "join", "room": "r", "id": 1}))["type"] == "joined"
    assert http(f"{node.http}/readyz") == (200, {"status": "ready"})
    assert redis_errors(node)["oom"] == 0

    r = redis.Redis.from_url(redis_server.url)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    refused = await alice.request({"type": "publish", "room": "r", "data": "x", "id": 2})
    assert refused["type"] == "error" and refused["code"] == "unavailable", refused
    await wait_for(lambda: http(f"{node.http}/readyz") == (
        503, {"status": "unavailable", "redis": "oom"}), timeout=FOLLOWS, what="readyz oom")
    status, health = http(f"{node.http}/healthz")
    assert status == 200 and health["broker"] is True and health["redis"] == "oom", health
    await wait_for(lambda: logged(node, "redis command failed", kind="oom", level="warning"),
                   timeout=FOLLOWS, what="the oom warning")
    line = logged(node, "redis command failed", kind="oom")[0]
    # Whichever came first: the publish, the probe or presence's lease refresh (a pipeline).
    assert line["error_type"] == "OutOfMemoryError", line
    assert "command not allowed when used memory > 'maxmemory'" in line["error"], line
    # Every line names its node, also those of the Redis batcher, which serves every caller.
    assert [x["node_id"] for x in logged(node, "redis command failed")] == [node.node_id] * len(
        logged(node, "redis command failed"))
    assert logged(node, "redis not ready", reason="oom", level="warning")
    assert redis_errors(node)["oom"] >= 1

    r.config_set("maxmemory", 0)
    await wait_for(lambda: http(f"{node.http}/readyz") == (200, {"status": "ready"}),
                   timeout=FOLLOWS, what="ready again")
    assert logged(node, "redis ready again", was="oom", level="info")
    published = await alice.request({"type": "publish", "room": "r", "data": "y", "id": 3})
    assert published["type"] == "published", published


async def test_killed_redis_readyz_says_unreachable_and_healthz_stays_live(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Redis gone: /readyz is 503 {"redis": "unreachable"}, /healthz is still 200 (with
    broker false), connection failures are counted and logged."""
    node = start_node(redis_server.url)
    assert http(f"{node.http}/readyz") == (200, {"status": "ready"})
    redis_server.kill()
    await wait_for(lambda: http(f"{node.http}/readyz") == (
        503, {"status": "unavailable", "redis": "unreachable"}), timeout=FOLLOWS,
        what="readyz unreachable")
    status, health = http(f"{node.http}/healthz")
    assert status == 200 and health["broker"] is False and health["redis"] == "unreachable"
    await wait_for(lambda: logged(node, "redis command failed", kind="connection"),
                   timeout=FOLLOWS, what="the connection warning")
    assert redis_errors(node)["connection"] >= 1


async def test_read_only_replica_readyz_says_readonly(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """A node pointed at a read-only replica: its publishes get 'unavailable' and /readyz
    answers 503 {"redis": "readonly"}."""
    with extra_redis() as replica:
        client = redis.Redis.from_url(replica.url)
        # The full sync goes over the socket on both sides: no RDB file in the working directory.
        primary = redis.Redis.from_url(redis_server.url)
        primary.config_set("repl-diskless-sync", "yes")
        primary.config_set("repl-diskless-sync-delay", 0)
        client.config_set("repl-diskless-load", "on-empty-db")
        client.replicaof("127.0.0.1", redis_server.port)
        await wait_for(lambda: client.info("replication")["master_link_status"] == "up",
                       timeout=10, what="replica in sync")
        node = start_node(replica.url)
        await wait_for(lambda: http(f"{node.http}/readyz") == (
            503, {"status": "unavailable", "redis": "readonly"}), timeout=FOLLOWS,
            what="readyz readonly")
        alice = await native(node, "alice")
        refused = await alice.request({"type": "publish", "room": "r", "data": "x", "id": 1})
        assert refused["type"] == "error" and refused["code"] == "unavailable", refused
        await wait_for(lambda: logged(node, "redis command failed", kind="readonly"),
                       timeout=FOLLOWS, what="the readonly warning")
        assert redis_errors(node)["readonly"] >= 1


async def test_low_pubsub_output_buffer_limit_is_warned_at_start_and_after_a_reconnect(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """With a pub/sub output-buffer limit below the recommended one the node logs a WARNING
    naming the limit, the recommended one and the command, at start and after each reconnect;
    with the recommended limit it logs that the limit was checked, and no warning."""
    r = redis.Redis.from_url(redis_server.url)
    r.config_set("client-output-buffer-limit", "pubsub 1mb 512kb 30")
    node = start_node(redis_server.url)
    await wait_for(lambda: node.logged("redis pubsub output buffer limit is low"),
                   timeout=FOLLOWS, what="the start-up warning")
    warning = node.logged("redis pubsub output buffer limit is low")[0]
    assert warning["level"] == "warning"
    assert (warning["hard"], warning["soft"], warning["soft_seconds"]) == (
        1024 * 1024, 512 * 1024, 30)
    assert (warning["recommended_hard"], warning["recommended_soft"],
            warning["recommended_soft_seconds"]) == (256 * 1024 * 1024, 64 * 1024 * 1024, 60)
    assert warning["command"] == (
        'CONFIG SET client-output-buffer-limit "pubsub 256mb 64mb 60"')

    def reconnect(times: int) -> Callable[[], bool]:
        return lambda: len(node.logged("redis pubsub connected")) >= times

    r.client_kill_filter(_type="pubsub")
    await wait_for(reconnect(2), timeout=FOLLOWS, what="the reader's reconnect")
    await wait_for(lambda: len(node.logged("redis pubsub output buffer limit is low")) == 2,
                   timeout=FOLLOWS, what="the warning after the reconnect")

    r.config_set("client-output-buffer-limit", "pubsub 256mb 64mb 60")
    r.client_kill_filter(_type="pubsub")
    await wait_for(reconnect(3), timeout=FOLLOWS, what="the second reconnect")
    await wait_for(lambda: node.logged("redis pubsub output buffer limit checked"),
                   timeout=FOLLOWS, what="the check with the recommended limit")
    assert len(node.logged("redis pubsub output buffer limit is low")) == 2


async def test_pubsub_limit_that_cannot_be_read_is_logged_at_info(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Where CONFIG is not allowed (managed Redis; here an ACL), the node says at INFO that it
    could not check the limit, and is ready all the same."""
    redis.Redis.from_url(redis_server.url).execute_command("ACL", "SETUSER", "default", "-config")
    node = start_node(redis_server.url)
    await wait_for(lambda: node.logged("could not check redis pubsub output buffer limit"),
                   timeout=FOLLOWS, what="the info line")
    line = node.logged("could not check redis pubsub output buffer limit")[0]
    assert line["level"] == "info" and line["error_type"] == "NoPermissionError", line
    assert not node.logged("redis pubsub output buffer limit is low")
    assert http(f"{node.http}/readyz") == (200, {"status": "ready"})


# --- in process: redis_common against a real redis-server -----------------------------------


def test_failures_are_classified_by_kind() -> None:
    """redis-py's exceptions map to the documented kinds; NOSCRIPT is not a failure."""
    from redis import exceptions as e

    assert classify(e.ConnectionError("Error 111 connecting")) == "connection"
    assert classify(ConnectionRefusedError()) == "connection"
    assert classify(e.TimeoutError("Timeout reading from socket")) == "timeout"
    assert classify(TimeoutError()) == "timeout"
    assert classify(e.ConnectionError("No connection available.")) == "pool"
    assert classify(e.MaxConnectionsError("Too many connections")) == "pool"
    assert classify(e.OutOfMemoryError("command not allowed when used memory")) == "oom"
    assert classify(e.ResponseError("OOM command not allowed ... script: ab")) == "oom"
    assert classify(e.ReadOnlyError("You can't write against a read only replica.")) \
        == "readonly"
    assert classify(e.ResponseError("READONLY You can't write ... script: ab")) == "readonly"
    assert classify(e.ResponseError("MISCONF Redis is configured to save RDB")) == "misconf"
    assert classify(e.ResponseError(
        "Command # 1 (SET k v) of pipeline caused error: ('MISCONF Redis is configured',)")) \
        == "misconf"
    assert classify(e.ResponseError("WRONGTYPE Operation against a key")) == "other"
    assert classify(e.NoScriptError("No matching script.")) is None


def test_warning_is_rate_limited_per_kind_with_a_count() -> None:
    """An outage logs a kind's first failure at once, then at most one line per interval
    carrying how many failures it stands for; another kind has its own interval."""
    from redis import exceptions as e

    now = [100.0]
    health = RedisHealth(warn_every=10.0, now=lambda: now[0])
    with structlog.testing.capture_logs() as lines:
        for _ in range(500):
            health.failed(e.ConnectionError("refused"), "EVALSHA")
            now[0] += 0.01  # 500 failures over 5 s: one line.
        health.failed(e.OutOfMemoryError("OOM command not allowed"), "SET")
        health.flush()  # Not yet 10 s since the connection line: nothing more.
        now[0] = 110.0
        health.flush()
    failures = [line for line in lines if line["event"] == "redis command failed"]
    assert [(f["kind"], f["count"], f["log_level"]) for f in failures] == [
        ("connection", 1, "warning"), ("oom", 1, "warning"), ("connection", 499, "warning")]
    assert health.errors()["connection"] == 500 and health.errors()["oom"] == 1
    assert health.problem() == "oom"  # A write refusal seen by a request marks it at once.
    with structlog.testing.capture_logs() as lines:
        health.probed(None)
    assert health.problem() is None
    assert [line["event"] for line in lines] == ["redis ready again"]


@pytest.fixture
def config(redis_server: RedisServer) -> Config:
    return Config(redis_url=redis_server.url, node_id="health-test", redis_timeout=0.5)


async def test_command_client_counts_failed_commands_scripts_and_pipelines(
    redis_server: RedisServer, config: Config
) -> None:
    """Every failure of the shared command client is counted, whichever backend sent it (a
    plain command, a pipeline, a Lua script), and turns into BrokerUnavailable in a backend;
    a script flushed from Redis is reloaded by redis-py without counting as a failure."""
    from redis import exceptions as e

    health = RedisHealth()
    client = connect(config, health=health)
    history = RedisHistory(client, Keys(f"t{secrets.token_hex(4)}"))
    admin = redis.Redis.from_url(redis_server.url)
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        with pytest.raises(e.OutOfMemoryError):
            await client.set("k", "v")
        with pytest.raises(e.ResponseError):
            async with client.pipeline(transaction=False) as pipe:
                pipe.set("k", "v")
                await pipe.execute()
        with pytest.raises(BrokerUnavailable):
            await history.read("room")  # history.lua, then a write for the room's epoch.
        assert health.errors()["oom"] == 3 and health.problem() == "oom"

        admin.config_set("maxmemory", 0)
        admin.script_flush()
        assert (await history.read("room")).epoch
        assert health.errors()["other"] == 0
    finally:
        admin.config_set("maxmemory", 0)
        await client.aclose()


async def test_busy_pool_makes_a_command_wait_then_fail_as_pool(config: Config) -> None:
    """With every pooled connection busy a command waits (BlockingConnectionPool) and gets one
    as soon as it is released; after --redis-timeout it fails with kind 'pool'."""
    health = RedisHealth()
    client = connect(config, pool_size=2, health=health)
    pool = client.connection_pool
    try:
        held = [await pool.get_connection(), await pool.get_connection()]
        freed = held.pop()
        asyncio.get_running_loop().call_later(
            0.2, lambda: asyncio.ensure_future(pool.release(freed)))
        started = time.monotonic()
        assert await client.ping() is True  # redis-py's default pool would refuse at once.
        assert time.monotonic() - started >= 0.15
        assert health.errors()["pool"] == 0

        held.append(await pool.get_connection())
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        assert time.monotonic() - started >= config.redis_timeout * 0.9
        assert health.errors()["pool"] == 1
        for connection in held:
            await pool.release(connection)
    finally:
        await client.aclose()


async def test_new_connections_name_the_library_without_reading_its_metadata(
    config: Config, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connections of the node's clients still carry which library and version they are (what
    CLIENT SETINFO sends where Redis has it, 7.2 on: lib-name, lib-ver), from what was read
    once at start: making one does not look the version up on disk again, which a join storm
    that grows the pools paid per connection (0.6 ms of CPU each)."""
    import importlib.metadata

    lookups: list[str] = []
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: lookups.append(name) or real(name))
    client = connect(config, pool_size=4)
    pool = client.connection_pool
    try:
        held = [await pool.get_connection() for _ in range(3)]  # Three new connections.
        assert {(c.driver_info.formatted_name, c.driver_info.lib_version)
                for c in held} == {("redis-py", real("redis"))}
        for connection in held:
            await pool.release(connection)
        assert await client.ping() is True
        listed = [c for c in await client.client_list()
                  if c["name"] == "roomcast:health-test:commands"]
        assert len(listed) == 3
        assert lookups == []
    finally:
        await client.aclose()
