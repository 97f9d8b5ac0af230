"""Presence stays bounded on a real redis-server: a mass disconnect is announced right after
the grace window, and a room's presence keys neither outlive its members nor live without a TTL."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from roomcast.backends import presence_redis
from roomcast.backends.keys import Keys
from roomcast.backends.presence import Member
from roomcast.backends.presence_redis import RedisPresence
from roomcast.config import Config
from tests.harness import Client, NodeProcess, RedisServer, native, wait_for
from tests.test_presence import get

#: Connections that drop at once (the issue saw 5000; 1000 keeps the suite fast).
CROWD = 1000
#: The default --idle-room-ttl: the longest a room's presence keys may live unrefreshed.
IDLE_ROOM_TTL = Config(node_id="-").idle_room_ttl


async def crowd(node: NodeProcess, room: str, count: int) -> list[Client]:
    """``count`` native clients of distinct users, each joined to ``room`` (100 at a time)."""
    gate = asyncio.Semaphore(100)

    async def one(i: int) -> Client:
        async with gate:
            client = await native(node, f"u{i:04d}")
            reply = await client.request({"type": "join", "room": room, "id": 1}, timeout=20)
            assert reply["type"] == "joined", reply
            return client

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_a_mass_disconnect_is_announced_within_two_seconds_of_the_grace_window(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """1000 users of one room on one node drop at once: a watcher on another node gets every
    one of their user_left within the grace window (1 s) plus 2 s of the drop."""
    flags = ("--presence-grace", "1", "--rate-burst", "500")
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    watcher = await native(a, "watcher")
    await watcher.request({"type": "join", "room": "r", "id": 1})
    users = await crowd(b, "r", CROWD)
    joined: set[str] = set()
    while len(joined) < CROWD:
        joined.add((await watcher.expect("user_joined", timeout=20))["user_id"])
    dropped = time.monotonic()
    for user in users:
        user.ws.transport.abort()  # Gone without a closing handshake, all in one turn.
    left: dict[str, float] = {}
    deadline = dropped + 1 + 2 + 5  # Wait a little past the bound, to report the figure.
    while len(left) < CROWD:
        try:
            event = await watcher.expect("user_left", timeout=deadline - time.monotonic())
        except TimeoutError:
            break
        left.setdefault(event["user_id"], time.monotonic() - dropped)
    first, last = min(left.values()), max(left.values())
    print(f"{len(left)}/{CROWD} user_left after a drop at once: first {first:.2f}s, "
          f"last {last:.2f}s (grace 1 s)")
    assert set(left) == joined
    assert last <= 1 + 2
    assert get(a, "/api/rooms/r/members")["count"] == 1


def presence_names(keys: Keys, room: str, nodes: list[str]) -> set[str]:
    """Every presence key of ``room`` keys.py builds for these nodes."""
    return {keys.presence(room, node) for node in nodes} | {
        keys.presence_nodes(room), keys.users(room), keys.nicks(room), keys.leaves(room),
        keys.leave_names(room)}


async def room_keys(client: aioredis.Redis, keys: Keys, room: str) -> dict[str, int]:
    """Every key in Redis with the room's hash tag, and its TTL in ms (-1: none)."""
    found: dict[str, int] = {}
    async for raw in client.scan_iter(match=f"{keys.prefix}:*{{{room}}}*", count=1000):
        name = raw.decode()
        found[name] = await client.pttl(name)
    return found


async def test_a_room_everybody_left_leaves_no_presence_key_and_none_lives_without_a_ttl(
    redis_server: RedisServer, redis_client: aioredis.Redis,
    start_node: Callable[..., NodeProcess],
) -> None:
    """While a room has members on two nodes, each of its presence keys has a TTL of at most
    --idle-room-ttl; once everybody left and the grace window passed, no presence key of the
    room remains, nor the room in a node's rooms set or the leave index."""
    flags = ("--presence-grace", "0.5", "--rate-burst", "500")
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    assert a.node_id is not None and b.node_id is not None
    keys = Keys()
    ann, bob = await native(a, "ann"), await native(b, "bob")
    assert (await ann.request({"type": "join", "room": "r", "nick": "Ann", "id": 1}))[
        "type"] == "joined"
    await bob.request({"type": "join", "room": "r", "id": 1})
    await bob.request({"type": "history", "room": "r", "id": 2})
    live = await room_keys(redis_client, keys, "r")
    names = presence_names(keys, "r", [a.node_id, b.node_id])
    present = {name: ttl for name, ttl in live.items() if name in names}
    assert set(present) == names - {keys.leaves("r"), keys.leave_names("r")}, live
    for name, ttl in present.items():
        assert 0 < ttl <= IDLE_ROOM_TTL * 1000, (name, ttl)
    # Keys of the room that are not presence: history's (meta:{r}, written by the joins'
    # position read, is history_redis.py's and has a bound of its own) and nothing else.
    assert set(live) - names <= {keys.meta("r"), keys.stream("r")}, live
    for node in (a, b):
        assert 0 < await redis_client.pttl(keys.node_rooms(node.node_id)) <= IDLE_ROOM_TTL * 1000

    closed = time.monotonic()
    await ann.close()
    await bob.close()

    async def gone() -> bool:
        left = set(await room_keys(redis_client, keys, "r")) & names
        indexed = await redis_client.zscore(keys.leave_rooms(), "r")
        in_sets = [await redis_client.sismember(keys.node_rooms(node.node_id), "r")
                   for node in (a, b)]
        return not left and indexed is None and not any(in_sets)

    await wait_for(gone, timeout=0.5 + 5, interval=0.1, what="the room's presence keys gone")
    print(f"no presence key of the room {time.monotonic() - closed:.1f}s after its last member "
          f"left (grace 0.5 s)")


async def test_a_cluster_that_died_leaves_presence_keys_that_expire(
    redis_server: RedisServer, redis_client: aioredis.Redis,
    start_node: Callable[..., NodeProcess],
) -> None:
    """Every node killed with -9 at once, nobody left to reap: each presence key the room and
    the nodes had still carries a TTL of at most --idle-room-ttl, so nothing stays forever."""
    a, b = start_node(redis_server.url), start_node(redis_server.url)
    assert a.node_id is not None and b.node_id is not None
    keys = Keys()
    ann, bob, cat = await native(a, "ann"), await native(b, "bob"), await native(b, "cat")
    await ann.request({"type": "join", "room": "r", "nick": "Ann", "id": 1})
    await bob.request({"type": "join", "room": "r", "id": 1})
    await cat.request({"type": "join", "room": "r", "id": 1})
    await cat.close()  # A pending leave, too.

    async def leave_pending() -> bool:
        return await redis_client.exists(keys.leaves("r")) == 1

    await wait_for(leave_pending, timeout=5, what="cat's pending leave")
    a.kill()
    b.kill()
    names = presence_names(keys, "r", [a.node_id, b.node_id]) | {
        keys.node_rooms(a.node_id), keys.node_rooms(b.node_id), keys.node_info(a.node_id),
        keys.node_info(b.node_id)}
    remaining = {name: await redis_client.pttl(name) for name in names}
    remaining = {name: ttl for name, ttl in remaining.items() if ttl != -2}  # -2: no such key
    assert keys.presence("r", a.node_id) in remaining and keys.leaves("r") in remaining
    for name, ttl in remaining.items():
        assert 0 < ttl <= IDLE_ROOM_TTL * 1000, (name, ttl)


async def test_a_rooms_presence_keys_are_refreshed_while_it_has_members(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A room's presence keys outlive their TTL for as long as a node has entries there: the
    node refreshes them before they expire."""
    monkeypatch.setattr(presence_redis, "TICK", 0.05)
    monkeypatch.setattr(presence_redis, "key_ttl", lambda room_ttl, lease_ttl: 0.6)
    keys = Keys(f"bounds-{secrets.token_hex(4)}")

    async def ignore(room: str, user_id: str, username: str) -> None:
        del room, user_id, username

    store = RedisPresence(redis_client, keys, "n1", grace=0.3, lease_ttl=2.0)
    await store.start(ignore)
    try:
        ann = Member("ann", "Ann", "n1", "c1", 1, "Ann")
        assert await store.claim_nick("r", "Ann", ann, owner="user:ann")
        assert await store.add("r", ann)
        started = time.monotonic()
        # Three TTLs later every key is still there, each with a TTL within one TTL.
        while time.monotonic() - started < 3 * 0.6:
            for name in (keys.presence("r", "n1"), keys.presence_nodes("r"), keys.users("r"),
                         keys.nicks("r")):
                assert 0 < await redis_client.pttl(name) <= 600, name
            await asyncio.sleep(0.05)
        assert await store.members("r") == [ann]
    finally:
        await store.close()


async def test_a_storm_of_first_joins_registers_the_room_in_batches(
    redis_server: RedisServer, redis_client: aioredis.Redis,
) -> None:
    """200 joins of a room the node has no entry of yet, at once: each puts the room in the
    node's rooms set (which a reaper of the node walks) with the set's TTL, as one batched
    script call in the same pipelines as the entries, not a MULTI transaction on a pooled
    connection of its own (200 at once emptied the pool: 'unavailable'); the set holds the
    room, with a TTL, and every member is there."""
    from tests.unit.test_slots import Monitor

    keys = Keys(f"storm-{secrets.token_hex(4)}")

    async def ignore(room: str, user_id: str, username: str) -> None:
        del room, user_id, username

    store = RedisPresence(redis_client, keys, "n1", grace=0.3, lease_ttl=2.0)
    await store.start(ignore)
    monitor = Monitor("127.0.0.1", redis_server.port)
    await monitor.start()
    try:
        members = [Member(f"u{i}", f"U{i}", "n1", f"c{i}", i) for i in range(200)]
        assert all(await asyncio.gather(*(store.add("r", m) for m in members)))
        commands = await monitor.stop(redis_client, keys=False)
        names = [c.name for c in commands]
        assert "MULTI" not in names
        registering = [c for c in commands if c.name == "EVALSHA"
                       and keys.node_rooms("n1").encode() in c.args]
        assert registering  # (Twice each, the first time Redis has not loaded the script.)
        assert len({c.source for c in registering}) == 1  # The batcher's one connection.
        assert await redis_client.smembers(keys.node_rooms("n1")) == {b"r"}
        assert await redis_client.pttl(keys.node_rooms("n1")) > 0
        assert len(await store.members("r")) == 200
    finally:
        await store.close()
