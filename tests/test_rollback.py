"""A Redis whose history went back (a failover to a replica that had not yet received the
newest writes): the node finds it on its refill, starts a new epoch and tells its members
explicitly, instead of letting reused offsets drop new messages as duplicates."""

from __future__ import annotations

from collections.abc import Callable

import redis

from roomcast.backends.keys import Keys
from tests.harness import NodeProcess, RedisServer, native, wait_for


async def test_history_that_went_back_starts_a_new_epoch_and_members_are_told(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Node b delivered offsets 1-5; Redis then holds only 1-3 (as a promoted replica would).
    After b's pub/sub connection is cut and b refills, its member gets a gap notice with a new
    epoch, and every message published afterwards arrives once, in order, in that epoch:
    none is dropped as a repeat of offsets 4 and 5."""
    a, b = start_node(redis_server.url), start_node(redis_server.url)
    pub, sub = await native(a, "pub"), await native(b, "sub")
    joined = await sub.request({"type": "join", "room": "k", "id": "j"})
    for i in range(5):
        ack = await pub.request({"type": "publish", "room": "k", "data": i, "id": i})
        assert ack["type"] == "published" and ack["offset"] == i + 1, ack
    assert [(await sub.expect("message"))["offset"] for _ in range(5)] == [1, 2, 3, 4, 5]

    # What a failover can leave: the offset counter and the stream two writes behind.
    r = redis.Redis.from_url(redis_server.url)
    keys = Keys()
    r.hset(keys.meta("k"), "offset", 3)
    r.xdel(keys.stream("k"), "4-0", "5-0")
    ids = [c["id"] for c in r.client_list(_type="pubsub")
           if c["name"] == f"roomcast:{b.node_id}:pubsub"]
    assert len(ids) == 1 and r.client_kill_filter(_id=ids[0]) == 1

    gap = await sub.expect("gap", timeout=15)
    assert gap["recovered"] is False and gap["offset"] == 0
    assert gap["epoch"] != joined["epoch"]
    assert b.logged("room history went back below what was delivered; new epoch")
    await wait_for(lambda: len(a.logged("redis pubsub connected")) >= 1, timeout=10,
                   what="node a connected")

    acked = []
    for i in range(5, 15):
        ack = await pub.request({"type": "publish", "room": "k", "data": i, "id": i})
        assert ack["type"] == "published", ack
        acked.append((ack["offset"], ack["epoch"]))
    got = [await sub.expect("message") for _ in range(10)]
    assert [m["data"] for m in got] == list(range(5, 15))
    assert [(m["offset"], m["epoch"]) for m in got] == acked
    assert acked[0] == (1, gap["epoch"])
