"""Presence, publish and history on a real Redis Cluster node, which refuses cross-slot work.

One redis-server in cluster mode owns all 16384 slots, so the plain client never gets MOVED,
while Redis itself still rejects a script whose KEYS span two slots, and a multi-key command or a
MULTI/EXEC transaction that does (CROSSSLOT). The scenario is the one of tests/unit/test_slots.py.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ClusterCrossSlotError

from roomcast.backends import presence_redis
from roomcast.backends.keys import Keys
from roomcast.tools.procs import find_binary
from tests.rediscluster import cluster_port
from tests.unit.test_slots import SCRIPT_NAMES, ScriptRecorder, every_name, key_slot, run_scenario

pytestmark = pytest.mark.redis


class ClusterNode:
    """redis-server with cluster mode on, on a free loopback port, owning every slot; its
    config file lives in a temporary directory removed on stop."""

    def __init__(self) -> None:
        binary = find_binary("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run the README test command (./dev test)")
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="roomcast-cluster-")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        # A port can be taken between picking and binding it: a start that fails is retried.
        for attempt in range(3):
            try:
                self._start(timeout)
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def _start(self, timeout: float) -> None:
        self.port = cluster_port()
        self.proc = subprocess.Popen(
            [self.binary, "--cluster-enabled", "yes",
             "--cluster-config-file", f"{self.dir}/nodes.conf", "--dir", self.dir,
             "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1)
        try:
            self._until(deadline, lambda: bool(client.ping()), "PING")
            client.execute_command(  # type: ignore[no-untyped-call]  # unannotated in redis-py
                "CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            self._until(deadline, lambda: b"cluster_state:ok" in client.execute_command(  # type: ignore[no-untyped-call]  # unannotated in redis-py
                "CLUSTER", "INFO"), "cluster_state:ok")
        finally:
            client.close()

    def _until(self, deadline: float, check: Callable[[], bool], what: str) -> None:
        """Poll ``check`` until true; fail at ``deadline`` or if the server exits."""
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster node: no {what}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterNode]:
    node = ClusterNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture
def fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Presence ticks every 50 ms instead of every second, so reaps and leaves come quickly."""
    monkeypatch.setattr(presence_redis, "TICK", 0.05)


async def keyslots(client: aioredis.Redis, names: list[str]) -> list[int]:
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.execute_command("CLUSTER", "KEYSLOT", name)
        return [int(slot) for slot in await pipe.execute()]


async def test_the_node_refuses_cross_slot_work(cluster: ClusterNode) -> None:
    """The harness can catch a mistake: a two-slot script, command or transaction is refused
    with CROSSSLOT, while one room's keys go together."""
    keys = Keys("probe")
    client = aioredis.Redis.from_url(cluster.url)
    try:
        mixed = [keys.users("lobby"), keys.nodes()]
        with pytest.raises(ClusterCrossSlotError):
            await client.eval("return 1", 2, *mixed)
        with pytest.raises(ClusterCrossSlotError):
            await client.delete(*mixed)
        with pytest.raises(ClusterCrossSlotError):
            async with client.pipeline(transaction=True) as pipe:
                pipe.hlen(mixed[0])
                pipe.zcard(mixed[1])
                await pipe.execute()
        assert await client.eval("return 1", 2, keys.users("lobby"), keys.leaves("lobby")) == 1
    finally:
        await client.aclose()


async def test_slot_function_agrees_with_the_server(cluster: ClusterNode) -> None:
    """The tests' CRC16 slot is Redis's own CLUSTER KEYSLOT, for every name keys.py builds."""
    names = sorted(every_name(Keys("p:q"), {"lobby", "attic:2", "a.b-C_9"}, {"n1", "host-ab12"}))
    names += ["123456789", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap", "foo{bar"]
    client = aioredis.Redis.from_url(cluster.url)
    try:
        assert await keyslots(client, names) == [key_slot(name) for name in names]
    finally:
        await client.aclose()


async def test_presence_and_history_run_on_a_redis_cluster(
    cluster: ClusterNode, fast_ticks: None
) -> None:
    """add, remove, claim_nick, members, stats, the reap of a dead node, user_left after the
    grace window, re-registration and a publish/history round trip all work on Redis Cluster
    (where a cross-slot call would fail), and every script call's keys share one slot by the
    server's own count."""
    with ScriptRecorder().installed() as recorder:
        await run_scenario(cluster.url)
    assert {call.script for call in recorder.calls} == set(SCRIPT_NAMES)
    client = aioredis.Redis.from_url(cluster.url)
    try:
        for call in recorder.calls:
            assert len(set(await keyslots(client, call.keys))) == 1, call
    finally:
        await client.aclose()
