"""A node whose whole Redis Cluster is gone: publishes get 'unavailable' (the Redis Cluster
client's own errors count as Redis failures, not as crashes), the node reports not ready, and
SIGTERM still stops it within its drain bound."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from tests.harness import NodeProcess, native, wait_for
from tests.rediscluster import running_cluster

pytestmark = pytest.mark.redis


def ready_status(node: NodeProcess) -> int:
    try:
        with urllib.request.urlopen(f"{node.http}/readyz", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_node_whose_redis_cluster_is_gone_answers_unavailable_and_stops(
    start_node: Callable[..., NodeProcess],
) -> None:
    """Every master killed: the next publishes get the 'unavailable' error envelope (never a
    1011 close), /readyz answers 503, nothing in the log says 'crashed', and SIGTERM stops
    the node (exit 0) within 15 s."""
    with running_cluster(masters=3) as cluster:
        node = start_node(cluster.seed_url, "--redis-cluster", "--redis-timeout", "1",
                          "--drain-delay", "0", "--drain-window", "0")
        client = await native(node, "u")
        assert (await client.request({"type": "join", "room": "lobby", "id": "j"}))["type"] \
            == "joined"
        ack = await client.request({"type": "publish", "room": "lobby", "data": 0, "id": 0})
        assert ack["type"] == "published", ack
        for master in cluster.masters():
            cluster.kill_master(master)
        replies = []
        for i in range(1, 6):  # Bounded: the first may wait for its timeout.
            reply = await client.request(
                {"type": "publish", "room": "lobby", "data": i, "id": i}, timeout=10)
            replies.append(reply)
            if reply.get("code") == "unavailable":
                break
        assert replies[-1]["type"] == "error" and replies[-1]["code"] == "unavailable", replies
        assert all(r["type"] in ("error", "message") for r in replies), replies
        await wait_for(lambda: ready_status(node) == 503, timeout=15, what="not ready")
        started = time.monotonic()
        assert node.stop(timeout=15) == 0
        assert time.monotonic() - started < 15
        crashed = [line for line in node.lines if "crashed" in str(line.get("event", ""))]
        assert crashed == [], crashed
