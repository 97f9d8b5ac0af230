"""A node whose Redis pub/sub connection is cut resubscribes and refills from history: its
members get every acknowledged message exactly once, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis

from tests.harness import NodeProcess, RedisServer, native, wait_for


async def test_pubsub_connection_killed_mid_stream_loses_nothing(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """CLIENT KILL TYPE pubsub while a publisher on another node keeps going: the cut node logs
    the loss, resubscribes, refills the gap from history, and its member sees every acknowledged
    message once, in order."""
    flags = ("--rate-limit", "10000", "--rate-burst", "10000")
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    pub, sub = await native(a, "pub"), await native(b, "sub")
    await sub.request({"type": "join", "room": "k", "id": "j"})
    r = redis.Redis.from_url(redis_server.url)
    acked: list[int] = []

    async def publish(values: range) -> None:
        for i in values:
            ack = await pub.request({"type": "publish", "room": "k", "data": i, "id": i})
            assert ack["type"] == "published", ack
            acked.append(i)

    await publish(range(20))
    # Cut node b's pub/sub connection (named roomcast:<node_id>:pubsub) and keep publishing on
    # a: these messages reach Redis while b is not subscribed.
    ids = [c["id"] for c in r.client_list(_type="pubsub")
           if c["name"] == f"roomcast:{b.node_id}:pubsub"]
    assert len(ids) == 1
    assert r.client_kill_filter(_id=ids[0]) == 1
    await publish(range(20, 60))
    await wait_for(lambda: b.logged("redis connection lost"), timeout=10,
                   what="node b noticed the cut")
    await wait_for(lambda: len(b.logged("redis pubsub connected")) >= 2, timeout=10,
                   what="node b resubscribed")
    await publish(range(60, 80))
    received = [(await sub.expect("message", timeout=10))["data"] for _ in range(80)]
    assert received == acked == list(range(80))
    # Barrier: a marker published last must be the very next message (no duplicate before it).
    await publish(range(80, 81))
    assert (await sub.expect("message", timeout=10))["data"] == 80
    offsets = [m["offset"] for m in sub.seen if m["type"] == "message"]
    assert offsets == list(range(1, 82))


async def test_a_half_open_pubsub_connection_is_noticed_and_refilled(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Node a's pub/sub connection goes silent without closing (a half-open TCP connection):
    its idle PING gets no answer within --redis-timeout, it reconnects and refills, and its
    member gets every acknowledged message once, in order."""
    from tests.tcpproxy import FreezingProxy

    proxy = await FreezingProxy(redis_server.port).start()
    flags = ("--rate-limit", "10000", "--rate-burst", "10000", "--redis-timeout", "1")
    # Started from a thread: the proxy runs on this event loop and must forward meanwhile.
    a = await asyncio.to_thread(start_node, f"redis://127.0.0.1:{proxy.port}/0", *flags)
    b = start_node(redis_server.url, *flags)
    sub, pub = await native(a, "sub"), await native(b, "pub")
    await sub.request({"type": "join", "room": "h", "id": "j"})
    acked: list[int] = []
    for i in range(5):
        ack = await pub.request({"type": "publish", "room": "h", "data": i, "id": i})
        acked.append(ack["offset"])
    assert [(await sub.expect("message"))["data"] for _ in range(5)] == [0, 1, 2, 3, 4]
    assert proxy.freeze(f"roomcast:{a.node_id}:pubsub".encode()) == 1
    for i in range(5, 25):
        ack = await pub.request({"type": "publish", "room": "h", "data": i, "id": i})
        acked.append(ack["offset"])
    await wait_for(lambda: a.logged("redis connection lost"), timeout=20,
                   what="the silent pub/sub connection noticed")
    received = [(await sub.expect("message", timeout=20))["data"] for _ in range(20)]
    assert received == list(range(5, 25))
    await proxy.close()


async def test_a_foreign_publish_on_a_roomcast_channel_is_dropped(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Someone PUBLISHes junk on a room channel and on the control channel: the node logs and
    drops it, and its pub/sub reader goes on delivering (it used to die for good)."""
    node = start_node(redis_server.url)
    pub, sub = await native(node, "pub"), await native(node, "sub")
    await sub.request({"type": "join", "room": "j", "id": 1})
    r = redis.Redis.from_url(redis_server.url)
    assert r.publish("roomcast:ch:{j}", b"not a roomcast frame") == 1
    r.publish("roomcast:control", b"hello")
    ack = await pub.request({"type": "publish", "room": "j", "data": "still", "id": 2})
    assert ack["type"] == "published"
    assert (await sub.expect("message"))["data"] == "still"
    assert node.logged("dropped a pub/sub message that is not a roomcast frame")
