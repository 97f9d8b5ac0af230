"""Consecutive publishes of one room that wait in one Redis pipeline run as one call of
publish.lua and travel as one pub/sub message (broker_redis._PublishQueue.merged): each is still
acked at its own offset, stored at that offset, and delivered once, in order. Runs break at
another room, an event and an idempotent publish, and the order across them holds. Redis is
stopped (SIGSTOP) while the burst is read, so that the pipeline that gathers it is known."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import orjson
import redis.asyncio as aioredis

from roomcast.backends.broker import Publication
from roomcast.backends.broker_redis import parse_message
from roomcast.backends.keys import Keys
from tests.harness import NodeProcess, RedisServer, barrier, native, wait_for
from tests.test_api import KEY, ok
from tests.test_pipelining import FAST, answers, collect, join, messages, publish

StartNode = Callable[..., NodeProcess]
KEYS = Keys()


def read_count(node: NodeProcess, kind: str) -> float:
    """roomcast_messages_in{type=kind}: frames of that type the node has read and decoded."""
    with urllib.request.urlopen(f"{node.api}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    prefix = f'roomcast_messages_in_total{{type="{kind}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


@contextmanager
def stopped(redis: RedisServer) -> Iterator[None]:
    assert redis.proc is not None
    redis.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        redis.proc.send_signal(signal.SIGCONT)


@asynccontextmanager
async def watching(client: aioredis.Redis, *rooms: str) -> AsyncIterator[aioredis.client.PubSub]:
    """A raw subscriber of the rooms' channels, as an operator's redis-cli would be."""
    pubsub = client.pubsub()
    await pubsub.subscribe(*(KEYS.channel(room) for room in rooms))
    for _ in rooms:
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
    try:
        yield pubsub
    finally:
        await pubsub.aclose()


async def frames_seen(pubsub: aioredis.client.PubSub, count: int) -> list[list[Publication]]:
    """Pub/sub messages until they hold ``count`` frames: each message's publications."""
    seen: list[list[Publication]] = []
    async with asyncio.timeout(20):
        while sum(len(m) for m in seen) < count:
            raw = await pubsub.get_message(timeout=20)
            if raw is not None and raw["type"] == "message":
                seen.append(parse_message(raw["channel"], raw["data"], KEYS.room_of_channel))
    return seen


async def test_a_burst_to_one_room_runs_as_few_scripts_and_each_message_arrives_once(
    start_node: StartNode, redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """300 publishes read while Redis is stopped: at most two pub/sub messages carry them (the
    pipeline that was in flight, and the one that gathered the rest); the acks have
    consecutive offsets in request order, the stream holds each envelope at its offset, and the
    member on the other node gets exactly those envelopes, once, in order."""
    a, b = (start_node(redis_server.url, *FAST, "--redis-timeout", "20", "--history-size", "1000")
            for _ in range(2))
    member = await native(b, "member")
    await join(member, "r")
    pub = await native(a, "pub")
    count = 300
    async with watching(redis_client, "r") as pubsub:
        with stopped(redis_server):
            for i in range(count):
                await pub.send(publish("r", {"n": i}, i))
            await wait_for(lambda: read_count(a, "publish") >= count, what="the burst read")
        acks = await answers(pub, count)
        seen = await frames_seen(pubsub, count)
    assert [(m["type"], m["id"]) for m in acks] == [("published", i) for i in range(count)]
    offsets = [m["offset"] for m in acks]
    assert offsets == list(range(offsets[0], offsets[0] + count))
    assert len(seen) <= 2, [len(m) for m in seen]
    frames = [p for message in seen for p in message]
    assert [p.offset for p in frames] == offsets
    got = await messages(member, count)
    assert [(m["data"]["n"], m["offset"]) for m in got] == list(enumerate(offsets))
    stored = await redis_client.xrange(KEYS.stream("r"))
    by_id = {int(entry_id.split(b"-")[0]): orjson.loads(fields[b"m"]) for entry_id, fields in
             stored}
    assert [by_id[offset] for offset in offsets] == got
    assert [orjson.loads(p.payload) for p in frames] == got
    assert (await barrier(pub, "r", member))["offset"] == offsets[-1] + 1


async def test_runs_break_at_another_room_and_an_event_and_the_order_holds(
    start_node: StartNode, redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """One pipeline holds 3 messages of room a, 2 of room b, another connection's typing in a,
    then 2 more of a: a member of both rooms on the other node gets them in exactly that
    order; on a's channel the typing is a message of its own, between the runs."""
    a, b = (start_node(redis_server.url, *FAST, "--redis-timeout", "20") for _ in range(2))
    member = await native(b, "member")
    await join(member, "ra")
    await join(member, "rb")
    typist = await native(a, "typist")
    await join(typist, "ra")
    pub = await native(a, "pub")
    async with watching(redis_client, "ra") as pubsub:
        with stopped(redis_server):
            for i, room in enumerate(["ra", "ra", "ra", "rb", "rb"]):
                await pub.send(publish(room, i, i))
            await wait_for(lambda: read_count(a, "publish") >= 5, what="5 publishes read")
            await typist.send({"type": "typing", "room": "ra"})
            await wait_for(lambda: read_count(a, "typing") >= 1, what="the typing read")
            for i in (5, 6):
                await pub.send(publish("ra", i, i))
            await wait_for(lambda: read_count(a, "publish") >= 7, what="7 publishes read")
        acks = await answers(pub, 7)
        seen = await frames_seen(pubsub, 6)
    assert [m["type"] for m in acks] == ["published"] * 7
    got = await collect(member, 8, lambda m: m["type"] in ("message", "typing"))
    assert [m["data"] if m["type"] == "message" else "typing" for m in got] == [
        0, 1, 2, 3, 4, "typing", 5, 6]
    assert [m["room"] for m in got] == ["ra"] * 3 + ["rb"] * 2 + ["ra"] * 3
    assert [[p.offset for p in message] for message in seen][-2:] == [
        [0], [acks[5]["offset"], acks[6]["offset"]]]
    await barrier(pub, "ra", member)
    await barrier(pub, "rb", member)


async def test_an_idempotent_publish_in_a_burst_is_a_run_of_its_own_and_its_retry_is_free(
    start_node: StartNode, redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """A server API publish with an idempotency key lands among a connection's burst: it is
    published alone (its key checked and recorded in its own run), every offset of the room is
    used once, the member gets each message once in offset order, and the key's retry returns
    the same offset, publishing nothing."""
    flags = (*FAST, "--redis-timeout", "20", "--api-key", KEY)
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    member = await native(b, "member")
    await join(member, "r")
    pub = await native(a, "pub")
    params = {"room": "r", "data": "keyed", "idempotency_key": "k-1"}
    async with watching(redis_client, "r") as pubsub:
        with stopped(redis_server):
            for i in range(20):
                await pub.send(publish("r", i, i))
            await wait_for(lambda: read_count(a, "publish") >= 20, what="20 publishes read")
            keyed = asyncio.ensure_future(ok(a, "publish", params))
            for i in range(20, 40):
                await pub.send(publish("r", i, i))
            await wait_for(lambda: read_count(a, "publish") >= 40, what="40 publishes read")
        acks = await answers(pub, 40)
        first = await keyed
        seen = await frames_seen(pubsub, 41)
    offsets = sorted([m["offset"] for m in acks] + [first["offset"]])
    assert offsets == list(range(offsets[0], offsets[0] + 41))
    assert [m["offset"] for m in acks] == sorted(m["offset"] for m in acks)
    [alone] = [message for message in seen if any(p.offset == first["offset"] for p in message)]
    assert len(alone) == 1
    got = await messages(member, 41)
    assert [m["offset"] for m in got] == offsets
    assert next(m for m in got if m["offset"] == first["offset"])["data"] == "keyed"
    again = await ok(a, "publish", params)
    assert (again["offset"], again["duplicate"]) == (first["offset"], True)
    assert (await barrier(pub, "r", member))["offset"] == offsets[-1] + 1
