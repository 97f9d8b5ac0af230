"""Regressions found by the review of issue 14 (cluster-mode speed, Redis Cluster): each test
states the behaviour the product promises, and failed before its fix."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis

from roomcast.backends.broker import Publication
from roomcast.backends.keys import Keys
from roomcast.backends.redis_common import load_script
from tests.contract.factories import RedisBackend, member
from tests.harness import Client, NodeProcess, RedisServer, native


def fastapi_url(node: NodeProcess, room: str, user_id: str, username: str) -> str:
    return node.ws(f"/ws/chat/{room}?user_id={user_id}&username={username}")


async def test_fastapi_client_in_a_large_room_still_sees_who_joins(
    start_node: Callable[..., NodeProcess],
) -> None:
    """A FastAPI-dialect client in a room above --presence-diff-above members still gets a
    user_joined (its dialect has no presence_diff) when another user joins."""
    node = start_node(None, "--presence-diff-above", "2", "--presence-diff-interval", "0.05",
                      "--presence-grace", "0.1", "--rate-burst", "500")
    web = await Client.open(fastapi_url(node, "big", "w", "Web"))
    await web.expect("room_members")
    others = [await native(node, f"n{i}") for i in range(2)]
    for client in others:
        await client.request({"type": "join", "room": "big", "id": "j"})
    # The room is large now (3 members here): the next join is gathered into a diff.
    late = await native(node, "late")
    await late.request({"type": "join", "room": "big", "id": "j"})
    joined = await web.expect("user_joined", timeout=3, user_id="late")
    assert joined["room_id"] == "big"


async def test_one_publishers_messages_to_two_rooms_arrive_in_publish_order(
    node: NodeProcess,
) -> None:
    """A member of rooms a and b gets one publisher's messages b1, a1, b2 in that order (one
    node, one broker stream: deliveries are in publish order, and so were the writes)."""
    watcher = await native(node, "watcher")
    publisher = await native(node, "pub")
    for room in ("a", "b"):
        await watcher.request({"type": "join", "room": room, "id": f"j{room}"})
        await publisher.request({"type": "join", "room": room, "id": f"j{room}"})
    for _ in range(20):  # Tries: the three must land within one flush interval.
        sent = [("b", "b1"), ("a", "a1"), ("b", "b2")]
        await asyncio.gather(*(publisher.send({"type": "publish", "room": room, "data": data,
                                               "id": data}) for room, data in sent))
        got = [(await watcher.expect("message"))["data"] for _ in sent]
        assert got == [data for _, data in sent], got


async def test_a_rooms_set_never_misses_a_room_with_an_entry_of_its_node(
    redis_server: RedisServer,
) -> None:
    """One connection leaves a room while another of the same node joins it: afterwards the
    room is still in the node's rooms set, since the joiner's entry is in it (the invariant
    the module docstring states: 'may name a room where the node has no entry, never the
    reverse')."""
    backend = RedisBackend(redis_server.url)
    keys = Keys(backend.prefix)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        store, _ = await backend.presence("n1")
        for attempt in range(40):  # Tries: nothing orders the two but their round trips.
            room = f"r{attempt}"
            await store.add(room, member("u1", f"a{attempt}"))
            leave = store.remove(room, member("u1", f"a{attempt}"))
            join = store.add(room, member("u2", f"b{attempt}"))
            await asyncio.gather(*((leave, join) if attempt % 2 else (join, leave)))
            assert await admin.hexists(keys.presence(room, "n1"), f"b{attempt}")
            assert await admin.sismember(keys.node_rooms("n1"), room), attempt
    finally:
        await admin.aclose()
        await backend.aclose()


async def test_one_callers_publishes_keep_their_order_while_scripts_are_reloaded(
    redis_server: RedisServer,
) -> None:
    """Publishes called one after the other get increasing offsets even while Redis loses its
    scripts and another client loads them again (a restart seen by every node at once)."""
    backend = RedisBackend(redis_server.url)
    admin = aioredis.Redis.from_url(redis_server.url)
    text = load_script("publish")
    stop = asyncio.Event()

    async def other_node() -> None:
        while not stop.is_set():
            await admin.script_flush()
            await admin.script_load(text)

    chaos = asyncio.create_task(other_node())
    try:
        pair = await backend.pair(history_size=0)
        for _ in range(40):  # Bursts: the flush must land inside a pipeline.
            published = await asyncio.gather(*(
                pair.publish("room", {"i": i, "pad": "x" * 200}) for i in range(256)),
                return_exceptions=True)
            # The acked ones (a publish may fail 'unavailable': the client was told).
            offsets = [p.offset for p in published if isinstance(p, Publication)]
            assert offsets == sorted(offsets), "a later publish got an earlier offset"
    finally:
        stop.set()
        await chaos
        await admin.aclose()
        await backend.aclose()
