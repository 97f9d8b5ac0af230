"""Redis-specific: brokers of several nodes on one Redis, and a broker surviving Redis.

MemoryBroker serves one node and cannot lose its backend, so these cases have no memory
counterpart; what one node sees is in test_broker.py, asserted for both.
"""

from __future__ import annotations

import asyncio

import pytest

from roomcast.backends.broker import BrokerUnavailable
from tests.contract.factories import WAIT, Pair, RedisBackend, assert_next_is, fields, prefix
from tests.harness import RedisServer, wait_for


async def test_a_publication_reaches_the_subscribers_of_every_node_once(
    redis_backend: RedisBackend,
) -> None:
    """A message published on one node is delivered, once and in order, to each node that
    subscribed the room, with the bytes and offset its publisher got."""
    a, b = await redis_backend.pair(), await redis_backend.pair()
    await a.broker.subscribe("r")
    await b.broker.subscribe("r")
    published = [await a.publish("r", n) for n in range(3)]
    for node in (a, b):
        assert [fields(await node.deliveries.next()) for _ in published] == [
            fields(p) for p in published
        ]
    marker = await b.publish("r", "marker", origin="c9")
    await assert_next_is(a.deliveries, marker)
    await assert_next_is(b.deliveries, marker)


async def test_publishers_on_two_nodes_share_one_offset_sequence(
    redis_backend: RedisBackend,
) -> None:
    """Publishes to one room from two nodes are numbered 1..n in one epoch and delivered in
    that order."""
    a, b = await redis_backend.pair(), await redis_backend.pair()
    await a.broker.subscribe("r")
    published = [await (a if n % 2 else b).publish("r", n) for n in range(6)]
    assert [p.offset for p in published] == [1, 2, 3, 4, 5, 6]
    assert len({p.epoch for p in published}) == 1
    assert [fields(await a.deliveries.next()) for _ in published] == [
        fields(p) for p in published
    ]


async def test_a_node_gets_only_the_rooms_it_subscribed(redis_backend: RedisBackend) -> None:
    """Subscriptions are per node: a room subscribed on another node is not delivered here."""
    a, b = await redis_backend.pair(), await redis_backend.pair()
    await a.broker.subscribe("mine")
    await b.broker.subscribe("theirs")
    theirs = await b.publish("theirs", 1)
    await assert_next_is(b.deliveries, theirs)
    await assert_next_is(a.deliveries, await b.publish("mine", "marker"))


async def test_history_written_through_one_node_is_read_on_another(
    redis_backend: RedisBackend,
) -> None:
    """Every node reads the same history: offsets, epoch and stored bytes."""
    a, b = await redis_backend.pair(), await redis_backend.pair()
    published = [await a.publish("r", n) for n in range(2)]
    result = await b.history.read("r")
    assert (result.offset, result.epoch, result.messages) == (
        2, published[0].epoch, [p.payload for p in published]
    )


async def test_while_redis_is_down_everything_is_unavailable_and_then_delivery_resumes(
    redis_server: RedisServer,
) -> None:
    """With Redis gone, publish, publish_event, publish_control and history raise
    BrokerUnavailable; once it is back, the broker resubscribes its rooms, says so, and
    delivers again (in a new epoch: this Redis lost its data)."""
    backend = RedisBackend(redis_server.url, redis_retry_max=0.2)
    try:
        pair = await backend.pair()
        await pair.broker.subscribe("r")
        before = await pair.publish("r", 1)
        await assert_next_is(pair.deliveries, before)

        redis_server.kill()
        await wait_for(lambda: not pair.broker.available, timeout=WAIT, what="unavailable")
        with pytest.raises(BrokerUnavailable):
            await pair.publish("r", 2)
        with pytest.raises(BrokerUnavailable):
            await pair.broker.publish_event("r", b"{}")
        with pytest.raises(BrokerUnavailable):
            await pair.history.read("r")
        with pytest.raises(BrokerUnavailable):
            await pair.broker.publish_control(b"x")

        redis_server.start()
        assert await pair.broker.wait_connected(WAIT)
        assert list(await asyncio.wait_for(pair.deliveries.resubscribed.get(), WAIT)) == ["r"]
        after = await pair.publish("r", 3)
        assert (after.offset, after.epoch != before.epoch) == (1, True)
        await assert_next_is(pair.deliveries, after)
    finally:
        await backend.aclose()


async def test_an_idempotent_retry_on_another_node_is_a_duplicate(
    redis_backend: RedisBackend,
) -> None:
    """The idempotency key lives in Redis: a retry through another node returns the first
    node's offset and epoch and publishes nothing to the room's subscribers."""
    a, b = await redis_backend.pair(), await redis_backend.pair()
    await a.broker.subscribe("r")
    first = await a.broker.publish("r", prefix("r", 1), "c1", idempotency_key="k")
    retry = await b.broker.publish("r", prefix("r", 1), "c9", idempotency_key="k")
    assert (retry.offset, retry.epoch, retry.duplicate) == (first.offset, first.epoch, True)
    await assert_next_is(a.deliveries, first)
    await assert_next_is(a.deliveries, await b.publish("r", "marker"))


async def with_control(backend: RedisBackend) -> tuple[Pair, asyncio.Queue[bytes]]:
    """A started pair whose on_control puts each payload on the returned queue."""
    pair = await backend.pair(start=False)
    control: asyncio.Queue[bytes] = asyncio.Queue()
    await pair.broker.start(pair.deliveries.on_publication, on_control=control.put_nowait)
    assert await pair.broker.wait_connected(WAIT), "broker did not connect"
    return pair, control


async def test_a_control_payload_reaches_every_node_of_the_cluster_once(
    redis_backend: RedisBackend, contract_redis: RedisServer,
) -> None:
    """publish_control on one node reaches on_control of every node on the prefix, the sender
    included, once each; a cluster on another prefix of the same Redis gets none of it."""
    (a, a_control), (b, b_control) = (await with_control(redis_backend),
                                      await with_control(redis_backend))
    other_cluster = RedisBackend(contract_redis.url)
    try:
        c, c_control = await with_control(other_cluster)
        await a.broker.publish_control(b"from a")
        await b.broker.publish_control(b"from b")
        for queue in (a_control, b_control):
            got = [await asyncio.wait_for(queue.get(), WAIT) for _ in range(2)]
            assert sorted(got) == [b"from a", b"from b"]
        await c.broker.publish_control(b"from c")
        assert await asyncio.wait_for(c_control.get(), WAIT) == b"from c"
        await a.broker.publish_control(b"barrier")
        for queue in (a_control, b_control):  # Nothing came twice, nothing came from c.
            assert await asyncio.wait_for(queue.get(), WAIT) == b"barrier"
    finally:
        await other_cluster.aclose()
