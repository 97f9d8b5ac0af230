"""Two node processes on one real redis-server: fan-out between nodes, and Redis failures."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

from tests.harness import NodeProcess, RedisServer, barrier, native, wait_for


def healthz(node: NodeProcess) -> dict[str, object]:
    with urllib.request.urlopen(f"{node.http}/healthz", timeout=5) as reply:
        result: dict[str, object] = json.loads(reply.read())
        return result


def cluster(start_node: Callable[..., NodeProcess], redis: RedisServer, *flags: str,
            count: int = 2) -> list[NodeProcess]:
    return [start_node(redis.url, "--rate-burst", "1000", "--rate-limit", "1000",
                       "--presence-grace", "0.5", *flags) for _ in range(count)]


async def test_cross_node_delivery_exactly_once_in_order(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Members on two nodes each get every message of a publisher on one node, once, in order."""
    a, b = cluster(start_node, redis_server)
    members = [await native(a, "a1"), await native(a, "a2"), await native(b, "b1"),
               await native(b, "b2")]
    for i, client in enumerate(members):
        assert (await client.request({"type": "join", "room": "g", "id": i}))["type"] == "joined"
    publisher = await native(a, "pub")
    count = 200
    for i in range(count):
        await publisher.send({"type": "publish", "room": "g", "data": i})
    for client in members:
        got = [(await client.expect("message"))["data"] for _ in range(count)]
        assert got == list(range(count))
        offsets = [m["offset"] for m in client.seen if m["type"] == "message"]
        assert offsets == list(range(1, count + 1))
    # No duplicate: the next message every member gets is a marker the publisher sent after.
    ack = await barrier(publisher, "g", *members)
    assert ack["offset"] == count + 1


async def test_room_unsubscribed_after_last_member_leaves(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """A node drops a room's Redis subscription after its last member leaves (and the linger)."""
    import redis

    (a,) = cluster(start_node, redis_server, "--unsubscribe-linger", "0.2", count=1)
    r = redis.Redis.from_url(redis_server.url)
    channel = "roomcast:ch:{lonely}"
    client = await native(a, "x")
    await client.request({"type": "join", "room": "lonely", "id": 1})
    assert r.pubsub_numsub(channel) == [(channel.encode(), 1)]
    await client.request({"type": "leave", "room": "lonely", "id": 2})
    await wait_for(lambda: r.pubsub_numsub(channel) == [(channel.encode(), 0)], timeout=5,
                   what="unsubscribe after linger")


async def test_redis_restart_publish_in_between_is_refused_then_delivery_resumes(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """With Redis down, clients stay connected and a publish gets 'unavailable'; after Redis is
    back, every node resubscribes and delivery resumes."""
    a, b = cluster(start_node, redis_server)
    alice, bob = await native(a, "alice"), await native(b, "bob")
    for client in (alice, bob):
        await client.request({"type": "join", "room": "r", "id": "j"})
    await alice.request({"type": "publish", "room": "r", "data": "before", "id": 1})
    assert (await bob.expect("message"))["data"] == "before"

    redis_server.kill()
    await wait_for(lambda: not healthz(a)["broker"] and not healthz(b)["broker"], timeout=10,
                   what="nodes notice Redis is gone")
    refused = await alice.request({"type": "publish", "room": "r", "data": "lost?", "id": 2})
    assert refused["type"] == "error" and refused["code"] == "unavailable"
    assert (await bob.request({"type": "ping", "id": "p"}))["type"] == "pong"

    redis_server.start()
    await wait_for(lambda: healthz(a)["broker"] and healthz(b)["broker"], timeout=15,
                   what="nodes reconnect to Redis")
    ack = await alice.request({"type": "publish", "room": "r", "data": "after", "id": 3})
    assert ack["type"] == "published"
    assert (await bob.expect("message"))["data"] == "after"
    assert not [m for m in bob.seen if m.get("data") == "lost?"]
    assert a.logged("redis connection lost") and a.logged("redis pubsub connected")
