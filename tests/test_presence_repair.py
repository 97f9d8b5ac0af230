"""Presence repair on a real redis-server: only the dead are reaped, and a node that was reaped
while alive puts its users back, so that every member's view matches who is connected."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from roomcast import clock
from roomcast.backends import presence_redis
from roomcast.backends.broker_redis import event_frame
from roomcast.backends.keys import Keys
from roomcast.backends.presence import Member
from roomcast.backends.presence_redis import RedisPresence
from roomcast.protocol import envelopes
from tests.faults import BUSY_KEY
from tests.harness import NodeProcess, RedisServer, barrier, native, wait_for
from tests.test_presence import get, next_presence_event, presence_events

#: A short lease, so that a node is reaped a few seconds after it stops renewing.
LEASE = ("--node-lease-ttl", "2", "--presence-grace", "0.5", "--rate-burst", "500")
#: How long the busy node's event loop is held: well past the lease and its reap margin.
BUSY = 5.0


async def test_a_busy_event_loop_longer_than_the_lease_is_not_reaped(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """A node whose event loop is held by CPU-bound work for 5 s, with a 2 s lease, keeps its
    lease (renewed outside the loop): no peer reaps it and nobody gets a user_left."""
    a = start_node(redis_server.url, *LEASE)
    b = start_node(redis_server.url, *LEASE, faults=["busy_on_data"])
    watcher, bob = await native(a, "watcher"), await native(b, "bob")
    await watcher.request({"type": "join", "room": "r", "id": 1})
    await bob.request({"type": "join", "room": "r", "id": 1})
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "bob")
    erin = await native(a, "erin")  # The barrier: she leaves after the busy spell.
    await erin.request({"type": "join", "room": "r", "id": 1})
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "erin")
    started = time.monotonic()
    ack = await bob.request(
        {"type": "publish", "room": "r", "data": {BUSY_KEY: BUSY}, "id": "busy"},
        timeout=BUSY + 10)
    busy_for = time.monotonic() - started
    assert ack["type"] == "published", ack
    assert busy_for >= BUSY
    # A reap of b during the spell would have scheduled bob's leave then, before erin's: the
    # leaves of one room go out in deadline order, so it would come first.
    await erin.close()
    assert await next_presence_event(watcher, timeout=8) == ("user_left", "erin")
    assert presence_events(watcher) == [
        ("user_joined", "bob"), ("user_joined", "erin"), ("user_left", "erin")]
    assert a.logged("reaped dead node") == []
    assert b.logged("re-registering presence") == []
    members = get(a, "/api/rooms/r/members")["members"]
    assert sorted(m["user_id"] for m in members) == ["bob", "watcher"]
    print(f"event loop busy for {busy_for:.1f}s with a 2 s lease: not reaped")


async def test_a_node_paused_past_its_lease_is_reaped_then_puts_its_users_back(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """SIGSTOP for longer than the lease: a peer reaps the node and its users are announced
    gone; after SIGCONT the node finds its lease gone, writes its entries back and its users
    are announced again (user_joined) to every other node. Its own members, the users
    themselves included, see neither the leave nor the return; presence lists them again."""
    a, b = start_node(redis_server.url, *LEASE), start_node(redis_server.url, *LEASE)
    watcher, carol, bob = (await native(a, "watcher"), await native(b, "carol"),
                           await native(b, "bob"))
    await watcher.request({"type": "join", "room": "r", "id": 1})
    await carol.request({"type": "join", "room": "r", "id": 1})
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "carol")
    await bob.request({"type": "join", "room": "r", "id": 1})
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "bob")
    assert await next_presence_event(carol, timeout=5) == ("user_joined", "bob")
    stopped = time.monotonic()
    b.signal(signal.SIGSTOP)
    try:
        left = {await next_presence_event(watcher, timeout=15) for _ in range(2)}
        reaped_after = time.monotonic() - stopped
        assert left == {("user_left", "bob"), ("user_left", "carol")}
    finally:
        b.signal(signal.SIGCONT)
    resumed = time.monotonic()
    back = {await next_presence_event(watcher, timeout=10) for _ in range(2)}
    back_after = time.monotonic() - resumed
    assert back == {("user_joined", "bob"), ("user_joined", "carol")}
    # Announced once the entries are written: presence already lists them.
    members = get(a, "/api/rooms/r/members")["members"]
    assert sorted(m["user_id"] for m in members) == ["bob", "carol", "watcher"]
    # Whichever came first on b, the user_left it received or its lease found gone: both have
    # been acted on once b logged the re-registration (then nothing more is announced).
    await wait_for(lambda: b.logged("re-registering presence"), timeout=5,
                   what="b re-registering")
    # The barrier: whatever b delivered to its members about the leave and the return was
    # published before this marker, so it has reached them by the time the marker has.
    await barrier(watcher, "r", watcher, bob, carol)
    assert presence_events(bob) == []
    assert presence_events(carol) == [("user_joined", "bob")]
    seen = presence_events(watcher)  # Each gone once, and back once.
    assert seen[:2] == [("user_joined", "carol"), ("user_joined", "bob")]
    assert (set(seen[2:4]), set(seen[4:])) == (left, back) and len(seen) == 6
    assert [line["dead_node"] for line in a.logged("reaped dead node")] == [b.node_id]
    print(f"paused node reaped (user_left) {reaped_after:.2f}s after SIGSTOP; its users "
          f"announced back {back_after:.2f}s after SIGCONT")


async def test_a_user_left_about_a_connected_user_is_corrected(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """A user_left about a user who is connected (announced just as the user came back) is
    not shown on the user's node, and that node announces the user again cluster-wide."""
    a, b = start_node(redis_server.url, *LEASE), start_node(redis_server.url, *LEASE)
    watcher, bob = await native(a, "watcher"), await native(b, "bob")
    await watcher.request({"type": "join", "room": "r", "id": 1})
    await bob.request({"type": "join", "room": "r", "id": 1})
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "bob")
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        # The wrong announcement, as a peer's user_left would go out.
        wrong = envelopes.event("user_left", "r", user_id="bob", username="bob",
                                ts=clock.now_ms())
        await admin.publish(Keys().channel("r"), event_frame(wrong, ""))
    finally:
        await admin.aclose()
    assert await next_presence_event(watcher, timeout=5) == ("user_left", "bob")
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "bob")
    await barrier(watcher, "r", watcher, bob)
    assert presence_events(bob) == []
    assert presence_events(watcher) == [
        ("user_joined", "bob"), ("user_left", "bob"), ("user_joined", "bob")]
    members = get(a, "/api/rooms/r/members")["members"]
    assert sorted(m["user_id"] for m in members) == ["bob", "watcher"]


# --- the store on its own ------------------------------------------------------------------------


class Back:
    """on_user_back of a store: each call, awaitable (bounded)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.changed = asyncio.Event()

    async def __call__(self, room: str, user_id: str, username: str) -> None:
        self.calls.append((room, user_id, username))
        self.changed.set()

    async def wait(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.calls) < count:
                self.changed.clear()
                await self.changed.wait()


async def ignore_left(room: str, user_id: str, username: str) -> None:
    del room, user_id, username


@pytest.fixture
def fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Presence ticks every 50 ms and room keys live 0.6 s, so that repairs come quickly."""
    monkeypatch.setattr(presence_redis, "TICK", 0.05)
    monkeypatch.setattr(presence_redis, "key_ttl", lambda room_ttl, lease_ttl: 0.6)


async def test_a_store_whose_entries_were_lost_writes_them_back_and_reports_the_users(
    redis_client: aioredis.Redis, fast_ticks: None
) -> None:
    """Redis loses a node's entries, with its lease (data loss) or without it (the room's keys
    deleted or expired): the node writes them back and reports each user as back, once."""
    keys = Keys(f"repair-{secrets.token_hex(4)}")
    back = Back()
    store = RedisPresence(redis_client, keys, "n1", grace=0.3, lease_ttl=2.0)
    await store.start(ignore_left, back)
    try:
        ann = Member("ann", "Ann", "n1", "c1", 1)
        assert await store.add("r", ann)
        assert await store.add("r", Member("ann", "Ann", "n1", "c2", 2)) is False
        await redis_client.flushdb()
        await back.wait(1)
        assert await store.members("r") == [ann, Member("ann", "Ann", "n1", "c2", 2)]
        await redis_client.delete(  # The lease stays.
            keys.presence("r", "n1"), keys.presence_nodes("r"), keys.users("r"))
        await back.wait(2)
        assert back.calls == [("r", "ann", "Ann"), ("r", "ann", "Ann")]
        assert len(await store.members("r")) == 2
        # Restoring what is there writes nothing and reports nobody.
        await store.restore("r", "ann")
        assert len(back.calls) == 2
    finally:
        await store.close()
