"""Consecutive publishes of one room that wait in one Redis pipeline run as one call of
publish.lua (broker_redis._PublishQueue.merged): each is still acked at its own offset, stored
at that offset, published as its own pub/sub frame, and delivered once, in order. Runs break at
another room, an event and an idempotent publish, and the order across them holds. Redis is
stopped (SIGSTOP) while the burst is read, so that the pipeline that gathers it is known; MONITOR
shows which script calls Redis ran."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
import pytest
import redis.asyncio as aioredis

from roomcast.backends.broker import Publication
from roomcast.backends.broker_redis import parse_frame
from roomcast.backends.keys import Keys
from roomcast.backends.redis_common import load_script
from tests.harness import NodeProcess, RedisServer, barrier, native, wait_for
from tests.test_api import KEY, ok
from tests.test_pipelining import (
    FAST,
    answers,
    collect,
    join,
    messages,
    publish,
    read_count,
    stopped,
)
from tests.unit.test_slots import Command, Monitor

StartNode = Callable[..., NodeProcess]
KEYS = Keys()
SHA = hashlib.sha1(load_script("publish").encode()).hexdigest().encode()


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


async def frames_seen(pubsub: aioredis.client.PubSub, count: int) -> list[Publication]:
    """The next ``count`` pub/sub messages, each parsed as the frame the nodes read."""
    seen: list[Publication] = []
    async with asyncio.timeout(20):
        while len(seen) < count:
            raw = await pubsub.get_message(timeout=20)
            if raw is not None and raw["type"] == "message":
                seen.append(parse_frame(raw["channel"], raw["data"], KEYS.room_of_channel))
    return seen


@dataclass
class Run:
    """One call of publish.lua as MONITOR saw it: its room and how many messages it carried."""

    room: str
    count: int
    keyed: bool


def runs(commands: list[Command]) -> list[Run | str]:
    """The publish.lua calls clients sent, in the order Redis ran them, and (as "event:<room>")
    the PUBLISHes clients sent themselves (events)."""
    out: list[Run | str] = []
    for command in commands:
        if command.source == "lua":
            continue
        if command.name == "EVALSHA" and command.args[1] == SHA:
            numkeys = int(command.args[2])
            meta = command.args[3].decode()
            argv = command.args[3 + numkeys:]
            out.append(Run(meta[meta.index("{") + 1:-1], int(argv[6]), numkeys == 3))
        elif command.name == "PUBLISH":
            channel = command.args[1].decode()
            out.append(f"event:{KEYS.room_of_channel(channel)}")
    return out


def joined_runs(calls: list[Run | str]) -> list[Run | str]:
    """``calls`` with neighbouring calls of one room (a run split by a pipeline's end) as one."""
    out: list[Run | str] = []
    for call in calls:
        last = out[-1] if out else None
        if (isinstance(call, Run) and isinstance(last, Run) and last.room == call.room
                and not last.keyed and not call.keyed):
            out[-1] = Run(call.room, last.count + call.count, False)
        else:
            out.append(call)
    return out


async def test_a_burst_to_one_room_runs_as_few_scripts_and_each_message_arrives_once(
    start_node: StartNode, redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """300 publishes (some of multi-byte text) read while Redis is stopped: at most two calls
    of publish.lua carry them (the pipeline in flight, and the one that gathered the rest);
    the acks have consecutive offsets in request order; each message is a pub/sub frame of its
    own and a stream entry at its offset; the member on the other node gets exactly those
    envelopes, once, in order."""
    a, b = (start_node(redis_server.url, *FAST, "--redis-timeout", "20", "--history-size", "1000")
            for _ in range(2))
    member = await native(b, "member")
    await join(member, "r")
    pub = await native(a, "pub")
    count = 300
    first = await barrier(pub, "r", member)  # Redis has the script (no NOSCRIPT rerun below).
    monitor = Monitor("127.0.0.1", redis_server.port)
    await monitor.start()
    async with watching(redis_client, "r") as pubsub:
        with stopped(redis_server):
            for i in range(count):
                await pub.send(publish("r", {"n": i, "text": "ünï €" * (i % 3)}, i))
            await wait_for(lambda: read_count(a, "publish") >= count, what="the burst read")
        acks = await answers(pub, count)
        seen = await frames_seen(pubsub, count)
    calls = runs(await monitor.stop(redis_client, keys=False))
    assert [(m["type"], m["id"]) for m in acks] == [("published", i) for i in range(count)]
    offsets = [m["offset"] for m in acks]
    assert offsets == list(range(first["offset"] + 1, first["offset"] + 1 + count))
    assert len(calls) <= 2, calls
    assert calls == [Run("r", run.count, False) for run in calls]
    assert sum(run.count for run in calls if isinstance(run, Run)) == count
    assert [p.offset for p in seen] == offsets
    got = await messages(member, count)
    assert [(m["data"]["n"], m["offset"]) for m in got] == list(enumerate(offsets))
    assert [m["data"]["text"] for m in got] == ["ünï €" * (i % 3) for i in range(count)]
    stored = await redis_client.xrange(KEYS.stream("r"))
    by_id = {int(entry_id.split(b"-")[0]): orjson.loads(fields[b"m"]) for entry_id, fields in
             stored}
    assert [by_id[offset] for offset in offsets] == got
    assert [orjson.loads(p.payload) for p in seen] == got
    assert (await barrier(pub, "r", member))["offset"] == offsets[-1] + 1


async def test_runs_break_at_another_room_and_an_event_and_the_order_holds(
    start_node: StartNode, redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """One pipeline holds 3 messages of room ra, 2 of rb, another connection's typing in ra,
    then 2 more of ra: Redis runs them as runs of one room each, in that order (the typing
    between them), and a member of both rooms on the other node gets them in that order."""
    a, b = (start_node(redis_server.url, *FAST, "--redis-timeout", "20") for _ in range(2))
    member = await native(b, "member")
    await join(member, "ra")
    await join(member, "rb")
    typist = await native(a, "typist")
    await join(typist, "ra")
    pub = await native(a, "pub")
    await barrier(pub, "ra", member, typist)  # Redis has the script (no NOSCRIPT rerun below).
    monitor = Monitor("127.0.0.1", redis_server.port)
    await monitor.start()
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
    assert [m["type"] for m in acks] == ["published"] * 7
    got = await collect(member, 8, lambda m: m["type"] in ("message", "typing"))
    calls = runs(await monitor.stop(redis_client, keys=False))
    assert [m["data"] if m["type"] == "message" else "typing" for m in got] == [
        0, 1, 2, 3, 4, "typing", 5, 6]
    assert [m["room"] for m in got] == ["ra"] * 3 + ["rb"] * 2 + ["ra"] * 3
    # The pipeline in flight when Redis stopped holds a first part of the five publishes (as
    # many as the node had read when it left), so a run may be split where it ended: joined
    # back, the calls are the runs, and the second pipeline's typing and ra run close them.
    assert len(calls) <= 5, calls
    assert joined_runs(calls) == [Run("ra", 3, False), Run("rb", 2, False), "event:ra",
                                  Run("ra", 2, False)], calls
    await barrier(pub, "ra", member)
    await barrier(pub, "rb", member)


async def test_an_idempotent_publish_in_a_burst_runs_alone_and_its_retry_is_free(
    start_node: StartNode, redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """A server API publish with an idempotency key, sent while a connection's burst to the
    same room waits on a stopped Redis: it runs as a call of its own (its key checked and
    recorded for it alone; where in the burst it lands is the node's business, and every
    check below holds wherever it does), every offset of the room is used once, the member
    gets each message once in offset order, and the key's retry returns the same offset,
    publishing nothing."""
    flags = (*FAST, "--redis-timeout", "20", "--api-key", KEY)
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    member = await native(b, "member")
    await join(member, "r")
    pub = await native(a, "pub")
    params = {"room": "r", "data": "keyed", "idempotency_key": "k-1"}
    await barrier(pub, "r", member)  # Redis has the script (no NOSCRIPT rerun below).
    monitor = Monitor("127.0.0.1", redis_server.port)
    await monitor.start()
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
    got = await messages(member, 41)
    calls = runs(await monitor.stop(redis_client, keys=False))
    offsets = sorted([m["offset"] for m in acks] + [first["offset"]])
    assert offsets == list(range(offsets[0], offsets[0] + 41))
    assert [m["offset"] for m in acks] == sorted(m["offset"] for m in acks)
    assert [run for run in calls if isinstance(run, Run) and run.keyed] == [Run("r", 1, True)]
    assert [m["offset"] for m in got] == offsets
    assert next(m for m in got if m["offset"] == first["offset"])["data"] == "keyed"
    again = await ok(a, "publish", params)
    assert (again["offset"], again["duplicate"]) == (first["offset"], True)
    assert (await barrier(pub, "r", member))["offset"] == offsets[-1] + 1


async def test_publish_lua_refuses_an_idempotency_key_for_several_messages(
    redis_client: aioredis.Redis,
) -> None:
    """The key records one offset, so the script takes it for one message only: a call that
    names a key for two is refused, and stores, publishes and records nothing."""
    room = "guarded"
    keys = [KEYS.meta(room), KEYS.stream(room), KEYS.idempotency(room, "k")]
    common = [KEYS.channel(room), 100, 0, "e0", "PUBLISH", 60_000]
    messages_ = [b'{"type":"message","room":"guarded","data":1', "c-1", 1,
                 b'{"type":"message","room":"guarded","data":2', "c-1", 2]
    script = redis_client.register_script(load_script("publish"))
    with pytest.raises(aioredis.ResponseError, match="an idempotent publish is one message"):
        await script(keys=keys, args=[*common, 2, *messages_])
    assert await redis_client.exists(*keys) == 0
    assert await script(keys=keys, args=[*common, 1, *messages_[:3]]) == [1, b"e0", 0]
    assert await script(keys=keys, args=[*common, 1, *messages_[:3]]) == [1, b"e0", 1]
