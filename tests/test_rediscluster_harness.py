"""The Redis Cluster harness (tests/rediscluster.py) against real redis-server processes: three
shards hold keys and shard channels, and a killed master's replica takes over."""

from __future__ import annotations

import time

import pytest
import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from tests.rediscluster import RedisCluster, RedisNode

pytestmark = pytest.mark.redis


def key_on(cluster: RedisCluster, client: redis.cluster.RedisCluster, master: RedisNode,
           prefix: str) -> str:
    """A key whose hash tag puts it in a slot of ``master``."""
    for i in range(1000):
        key = f"{{{prefix}-{i}}}:value"
        if master.owns(key_slot(key.encode())):
            return key
    raise AssertionError(f"no key of {prefix} on {master}")


def test_keys_spread_over_three_masters(redis_cluster: RedisCluster) -> None:
    """Keys with different hash tags land on all three masters, each where master_of_slot says
    (a plain client of that master alone reads them, so no redirect was needed)."""
    masters = redis_cluster.masters()
    assert len(masters) == 3 and not redis_cluster.replicas()
    assert redis_cluster.seed_url == f"redis://127.0.0.1:{redis_cluster.nodes[0].port}"
    holders: set[int] = set()
    with redis_cluster.client(decode_responses=True) as client:
        for i in range(30):
            key = f"{{spread-{i}}}:value"
            assert client.set(key, str(i))
            owner = redis_cluster.master_of_slot(key_slot(key.encode()))
            assert owner.client().get(key) == str(i)
            holders.add(owner.port)
    assert holders == {master.port for master in masters}


def test_sharded_pubsub_roundtrip(redis_cluster: RedisCluster) -> None:
    """SSUBSCRIBE on one shard channel per master, SPUBLISH on each: every message reaches its
    one subscriber through the channel's own master."""
    with redis_cluster.client(decode_responses=True) as client:
        channels = [key_on(redis_cluster, client, master, "spubsub")
                    for master in redis_cluster.masters()]
        pubsub = client.pubsub()
        try:
            pubsub.ssubscribe(*channels)
            confirmed: set[str] = set()
            received: dict[str, str] = {}
            deadline = time.monotonic() + 5
            while len(received) < len(channels):
                assert time.monotonic() < deadline, (confirmed, received)
                message = pubsub.get_sharded_message(timeout=0.1)
                if message is None:
                    continue
                if message["type"] == "ssubscribe":
                    confirmed.add(message["channel"])
                    if confirmed == set(channels):
                        for channel in channels:
                            assert client.spublish(channel, f"to {channel}") == 1
                elif message["type"] == "smessage":
                    received[message["channel"]] = message["data"]
            assert received == {channel: f"to {channel}" for channel in channels}
        finally:
            pubsub.close()


def test_pause_and_resume_a_master(redis_cluster: RedisCluster) -> None:
    """A SIGSTOPped master answers nothing; after SIGCONT the cluster is healthy again."""
    master = redis_cluster.masters()[1]
    stalled = redis.Redis(port=master.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    try:
        assert redis_cluster.pause_master(1) is master
        with pytest.raises(redis.TimeoutError):
            stalled.ping()
        redis_cluster.resume(master)
        assert redis_cluster.masters()[1] is master
        assert master.client().ping()
    finally:
        stalled.close()


def test_killed_master_is_replaced_by_its_replica(
    redis_cluster_with_replicas: RedisCluster,
) -> None:
    """SIGKILL a master: its replica is promoted within the bound, owns the slots with the
    data written before, the cluster takes writes on every shard again, and the old master
    restarted comes back as the new one's replica."""
    cluster = redis_cluster_with_replicas
    assert len(cluster.masters()) == 3 and len(cluster.replicas()) == 3
    victim = cluster.masters()[0]
    followers = cluster.replicas(of=victim)
    assert len(followers) == 1
    with cluster.client(decode_responses=True) as client:
        key = key_on(cluster, client, victim, "failover")
        slot = key_slot(key.encode())
        client.set(key, "before")
        assert victim.command("WAIT", 1, 2000) == 1  # The replica has it.

        killed = cluster.kill_master(0)
        assert killed is victim and not killed.alive
        promoted = cluster.wait_failover(killed, timeout=15)
        assert promoted is followers[0] and promoted.role == "master"
        assert cluster.master_of_slot(slot) is promoted
        assert cluster.last_failover is not None and cluster.last_failover.seconds < 15

    with cluster.client(decode_responses=True) as client:
        assert client.get(key) == "before"
        for master in cluster.masters():
            probe = key_on(cluster, client, master, "after")
            assert client.set(probe, "after") and client.get(probe) == "after"

    cluster.restart(killed)
    assert killed.role == "replica" and killed.master_id == promoted.node_id
    assert cluster.replicas(of=promoted) == [killed]
