"""Client-side sharding: several --redis-url, each room's messages and history on the Redis its
jump hash picks, presence and node state on the first; delivery exactly once and in order over
every shard, and a shard's lost pub/sub connection refilled from that shard's history."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from roomcast.backends.keys import Keys, shard
from tests.harness import Client, NodeProcess, RedisServer, native, running_redis, wait_for

FLAGS = ("--rate-limit", "10000", "--rate-burst", "10000")


@pytest.fixture
def second_redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


def rooms_per_shard(shards: int, each: int) -> list[str]:
    """``each`` room names on every shard, in shard order."""
    picked: dict[int, list[str]] = {i: [] for i in range(shards)}
    i = 0
    while any(len(names) < each for names in picked.values()):
        name = f"room-{i}"
        if len(picked[shard(name, shards)]) < each:
            picked[shard(name, shards)].append(name)
        i += 1
    return [name for index in range(shards) for name in picked[index]]


async def two_nodes_on_two_shards(
    first: RedisServer, second: RedisServer, start_node: Callable[..., NodeProcess],
    rooms: list[str], *, publisher_joins: bool,
) -> tuple[NodeProcess, Client, Client]:
    """Nodes a and b sharing the two Redis as shards, 'pub' on a and 'sub' on b; 'sub' joined
    to every room of ``rooms`` (and 'pub' too, with ``publisher_joins``). Returns b, pub, sub."""
    url = f"{first.url},{second.url}"
    a, b = start_node(url, *FLAGS), start_node(url, *FLAGS)
    pub, sub = await native(a, "pub"), await native(b, "sub")
    for room in rooms:
        await sub.request({"type": "join", "room": room, "id": f"j{room}"})
        if publisher_joins:
            await pub.request({"type": "join", "room": room, "id": f"k{room}"})
    return b, pub, sub


async def test_rooms_on_every_shard_deliver_every_ack_once_in_order_and_keep_their_history(
    redis_server: RedisServer, second_redis: RedisServer,
    start_node: Callable[..., NodeProcess],
) -> None:
    """Two nodes on two Redis shards: a publisher on a and a member on b in rooms of both
    shards; every acked message arrives once, in order; each room's stream is on its own
    shard's Redis only; presence (on the first) lists both nodes' members."""
    rooms = rooms_per_shard(2, 2)
    _, pub, sub = await two_nodes_on_two_shards(redis_server, second_redis, start_node, rooms,
                                                publisher_joins=True)
    acked: dict[str, list[int]] = {room: [] for room in rooms}
    for i in range(200):
        room = rooms[i % len(rooms)]
        ack = await pub.request({"type": "publish", "room": room, "data": i, "id": i})
        assert ack["type"] == "published", ack
        acked[room].append(ack["offset"])
    got: dict[str, list[int]] = {room: [] for room in rooms}
    for _ in range(200):
        message = await sub.expect("message")
        got[message["room"]].append(message["offset"])
    assert got == acked
    assert all(offsets == list(range(1, 51)) for offsets in got.values())

    keys = Keys()
    servers = [redis.Redis.from_url(redis_server.url), redis.Redis.from_url(second_redis.url)]
    for room in rooms:
        mine = shard(room, 2)
        assert servers[mine].xlen(keys.stream(room)) == 50
        assert not servers[1 - mine].exists(keys.stream(room), keys.meta(room))
    presence = await sub.request({"type": "presence", "room": rooms[-1], "id": "p"})
    assert {m["user_id"] for m in presence["members"]} == {"pub", "sub"}
    assert servers[0].exists(keys.users(rooms[-1])) and not servers[1].exists(
        keys.users(rooms[-1]))


async def test_a_shards_lost_pubsub_connection_is_refilled_from_that_shard(
    redis_server: RedisServer, second_redis: RedisServer,
    start_node: Callable[..., NodeProcess],
) -> None:
    """CLIENT KILL of node b's pub/sub connection on the second shard while a publisher keeps
    going: b reconnects every shard, refills, and its member gets every acked message of the
    rooms of both shards once, in order."""
    rooms = rooms_per_shard(2, 1)
    b, pub, sub = await two_nodes_on_two_shards(redis_server, second_redis, start_node, rooms,
                                                publisher_joins=False)
    acked: list[tuple[str, int]] = []

    async def publish(values: range) -> None:
        for i in values:
            room = rooms[i % 2]
            ack = await pub.request({"type": "publish", "room": room, "data": i, "id": i})
            assert ack["type"] == "published", ack
            acked.append((room, i))

    await publish(range(20))
    r = redis.Redis.from_url(second_redis.url)
    ids = [c["id"] for c in r.client_list(_type="pubsub")
           if c["name"] == f"roomcast:{b.node_id}:pubsub"]
    assert len(ids) == 1 and r.client_kill_filter(_id=ids[0]) == 1
    await publish(range(20, 60))
    await wait_for(lambda: len(b.logged("redis pubsub connected")) >= 2, timeout=15,
                   what="node b resubscribed")
    await publish(range(60, 80))
    received = [(m["room"], m["data"]) for m in
                [await sub.expect("message", timeout=10) for _ in range(80)]]
    assert sorted(received, key=lambda x: x[1]) == acked
    for room in rooms:
        assert [d for r_, d in received if r_ == room] == [d for r_, d in acked if r_ == room]
