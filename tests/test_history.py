"""History, offsets, epochs and recovery, on a lone node and on a two-node Redis cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import redis

from tests.harness import Client, NodeProcess, RedisServer, barrier, native, wait_for

Nodes = Callable[..., tuple[NodeProcess, NodeProcess]]


@pytest.fixture(params=["embedded", "cluster"])
def nodes(
    request: pytest.FixtureRequest, start_node: Callable[..., NodeProcess]
) -> Iterator[Nodes]:
    """nodes(*flags) -> (publisher's node, subscriber's node): one node in embedded mode, two
    nodes on a real redis-server in cluster mode."""
    redis_server: RedisServer | None = None
    if request.param == "cluster":
        redis_server = request.getfixturevalue("redis_server")

    def make(*flags: str) -> tuple[NodeProcess, NodeProcess]:
        common = ("--rate-limit", "10000", "--rate-burst", "10000", *flags)
        if redis_server is None:
            lone = start_node(None, *common)
            return lone, lone
        return start_node(redis_server.url, *common), start_node(redis_server.url, *common)

    yield make


async def publish_many(client: Client, room: str, values: range) -> None:
    for value in values:
        await client.send({"type": "publish", "room": room, "data": value})


async def test_history_keeps_the_last_n(nodes: Nodes) -> None:
    """history returns the newest --history-size messages, or the newest 'limit' of them."""
    a, b = nodes("--history-size", "5")
    pub, reader = await native(a, "pub"), await native(b, "reader")
    for i in range(8):
        await pub.request({"type": "publish", "room": "h", "data": i, "id": i})
    reply = await reader.request({"type": "history", "room": "h", "id": "h"})
    assert reply["type"] == "history" and reply["offset"] == 8
    assert [m["data"] for m in reply["messages"]] == [3, 4, 5, 6, 7]
    assert [m["offset"] for m in reply["messages"]] == [4, 5, 6, 7, 8]
    newest = await reader.request({"type": "history", "room": "h", "limit": 2, "id": "l"})
    assert [m["data"] for m in newest["messages"]] == [6, 7]
    since = await reader.request({"type": "history", "room": "h", "id": "s",
                                  "since": {"offset": 6, "epoch": reply["epoch"]}})
    assert [m["offset"] for m in since["messages"]] == [7, 8]


async def test_history_expires_after_ttl_with_a_new_epoch(nodes: Nodes) -> None:
    """After --history-ttl without publications the history is gone and the epoch changed."""
    a, b = nodes("--history-ttl", "1")
    pub, reader = await native(a, "pub"), await native(b, "reader")
    await pub.request({"type": "publish", "room": "t", "data": "old", "id": 1})
    first = await reader.request({"type": "history", "room": "t", "id": 2})
    assert [m["data"] for m in first["messages"]] == ["old"]

    async def expired() -> bool:
        reply = await reader.request({"type": "history", "room": "t", "id": "poll"})
        return reply["messages"] == [] and reply["epoch"] != first["epoch"]

    await wait_for(expired, timeout=10, interval=0.2, what="history expiry")
    ack = await pub.request({"type": "publish", "room": "t", "data": "new", "id": 3})
    assert ack["offset"] == 1 and ack["epoch"] != first["epoch"]


async def test_recovery_after_the_socket_is_cut(nodes: Nodes) -> None:
    """A client whose socket dies rejoins with 'since' and gets exactly what it missed, in
    order, then live messages."""
    a, b = nodes()
    pub, sub = await native(a, "pub"), await native(b, "sub")
    await sub.request({"type": "join", "room": "r", "id": 1})
    await publish_many(pub, "r", range(5))
    seen = [await sub.expect("message") for _ in range(5)]
    last = seen[-1]
    sub.ws.transport.abort()  # The network dies under the client.
    await publish_many(pub, "r", range(5, 15))
    await pub.request({"type": "ping", "id": "sync"})
    sub = await native(b, "sub")
    joined = await sub.request({"type": "join", "room": "r", "id": 2,
                                "since": {"offset": last["offset"], "epoch": last["epoch"]}})
    assert joined["recovered"] is True and joined["offset"] == 15
    replay = [(await sub.expect("message"))["data"] for _ in range(10)]
    assert replay == list(range(5, 15))
    await pub.send({"type": "publish", "room": "r", "data": "live"})
    assert (await sub.expect("message"))["data"] == "live"


async def test_recovery_with_a_concurrent_publisher(nodes: Nodes) -> None:
    """Rejoining with 'since' while a publisher keeps going loses and repeats nothing
    (checked over 3000 messages and three reconnects)."""
    a, b = nodes("--history-size", "5000")
    pub, sub = await native(a, "pub"), await native(b, "sub")
    await sub.request({"type": "join", "room": "c", "id": 0})
    total = 3000
    publisher = asyncio.create_task(publish_many(pub, "c", range(total)))
    received: list[int] = []
    for cut in range(3):
        while len(received) < (cut + 1) * 400:
            message = await sub.expect("message", timeout=10)
            received.append(message["data"])
            last = message
        sub.ws.transport.abort()
        sub = await native(b if cut % 2 else a, "sub")
        joined = await sub.request({"type": "join", "room": "c", "id": cut + 1, "since": {
            "offset": last["offset"], "epoch": last["epoch"]}})
        assert joined["recovered"] is True
    await asyncio.wait_for(publisher, 30)
    while len(received) < total:
        received.append((await sub.expect("message", timeout=10))["data"])
    assert received == list(range(total))
    # Nothing repeated after the last one: the next message is a marker published after it.
    ack = await barrier(pub, "c", sub)
    assert ack["offset"] == total + 1


async def test_unknown_epoch_is_not_recovered(nodes: Nodes) -> None:
    """A 'since' from another epoch, or older than what is kept, gets recovered:false with
    the current position, and no replay."""
    a, b = nodes("--history-size", "3")
    pub, sub = await native(a, "pub"), await native(b, "sub")
    for i in range(6):
        ack = await pub.request({"type": "publish", "room": "e", "data": i, "id": i})
    wrong = await sub.request({"type": "join", "room": "e", "id": "w",
                               "since": {"offset": 5, "epoch": "not-this-one"}})
    assert wrong["recovered"] is False
    assert (wrong["offset"], wrong["epoch"]) == (6, ack["epoch"])
    await sub.request({"type": "leave", "room": "e", "id": "l"})
    trimmed = await sub.request({"type": "join", "room": "e", "id": "t",
                                 "since": {"offset": 1, "epoch": ack["epoch"]}})
    assert trimmed["recovered"] is False and trimmed["offset"] == 6
    # No replay: the first message after either join is a marker published after both.
    marker = await barrier(pub, "e", sub)
    assert marker["offset"] == 7
    assert [m["offset"] for m in sub.seen if m["type"] == "message"] == [7]


async def test_redis_flush_changes_the_epoch(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """History lost in Redis (FLUSHALL) gives the room a new epoch; old positions are refused."""
    node = start_node(redis_server.url)
    client = await native(node, "c")
    ack = await client.request({"type": "publish", "room": "f", "data": 1, "id": 1})
    redis.Redis.from_url(redis_server.url).flushall()
    after = await client.request({"type": "publish", "room": "f", "data": 2, "id": 2})
    assert after["offset"] == 1 and after["epoch"] != ack["epoch"]
    joined = await client.request({"type": "join", "room": "f", "id": 3, "since": {
        "offset": ack["offset"], "epoch": ack["epoch"]}})
    assert joined["recovered"] is False and joined["epoch"] == after["epoch"]
