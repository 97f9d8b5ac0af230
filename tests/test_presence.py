"""Cluster-wide presence on a real redis-server: queries, events, node death, grace, nicks."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.harness import Client, NodeProcess, RedisServer, native, wait_for


def get(node: NodeProcess, path: str) -> Any:
    with urllib.request.urlopen(f"{node.http}{path}", timeout=5) as reply:
        return json.loads(reply.read())


PRESENCE_EVENTS = ("user_joined", "user_left")


async def next_presence_event(client: Client, timeout: float) -> tuple[str, str]:
    """(type, user_id) of the next user_joined/user_left the client receives; bounded."""
    event = await client.expect_any(PRESENCE_EVENTS, timeout=timeout)
    return event["type"], event["user_id"]


def presence_events(client: Client) -> list[tuple[str, str]]:
    """Every user_joined/user_left the client has received, in order."""
    return [(m["type"], m["user_id"]) for m in client.seen if m["type"] in PRESENCE_EVENTS]


def two_nodes(start_node: Callable[..., NodeProcess], redis: RedisServer,
              grace: str = "0.5") -> tuple[NodeProcess, NodeProcess]:
    flags = ("--presence-grace", grace, "--rate-burst", "500")
    return start_node(redis.url, *flags), start_node(redis.url, *flags)


async def test_presence_is_cluster_wide(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """A presence query on either node lists members of both nodes; stats list both nodes."""
    a, b = two_nodes(start_node, redis_server)
    alice, bob = await native(a, "alice", "Alice"), await native(b, "bob", "Bob")
    await alice.request({"type": "join", "room": "r", "id": 1})
    await bob.request({"type": "join", "room": "r", "id": 1})
    reply = await alice.request({"type": "presence", "room": "r", "id": 2})
    assert reply["count"] == 2
    assert {(m["user_id"], m["node_id"]) for m in reply["members"]} == {
        ("alice", a.node_id), ("bob", b.node_id)}
    for node in (a, b):
        members = get(node, "/api/rooms/r/members")
        assert members["count"] == 2
        assert {m["username"] for m in members["members"]} == {"Alice", "Bob"}
    stats = get(a, "/api/stats")
    assert set(stats["cluster"]["nodes"]) == {a.node_id, b.node_id}
    await wait_for(lambda: get(a, "/api/stats")["cluster"]["nodes"][b.node_id]["connections"] == 1,
                   what="b's connection count in a's stats")
    assert stats["cluster"]["rooms"] == {"r": 2}


async def test_user_joined_once_per_user_across_connections(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """A user with connections on two nodes is announced once, and leaves once, after both go."""
    a, b = two_nodes(start_node, redis_server)
    watcher = await native(a, "watcher")
    await watcher.request({"type": "join", "room": "r", "id": 1})
    erin = await native(a, "erin")  # The barrier: she leaves after carol has left.
    await erin.request({"type": "join", "room": "r", "id": 1})
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "erin")
    tab1, tab2 = await native(a, "carol"), await native(b, "carol")
    await tab1.request({"type": "join", "room": "r", "id": 1})
    await tab2.request({"type": "join", "room": "r", "id": 1})
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "carol")
    await tab1.close()
    await watcher.request({"type": "ping", "id": "sync"})
    await tab2.close()
    assert await next_presence_event(watcher, timeout=5) == ("user_left", "carol")
    # Every user_left is due a grace window after its user's last connection went: erin's, due
    # after carol's, comes after any other carol event that was on its way.
    await erin.close()
    assert await next_presence_event(watcher, timeout=5) == ("user_left", "erin")
    assert presence_events(watcher) == [
        ("user_joined", "erin"), ("user_joined", "carol"), ("user_left", "carol"),
        ("user_left", "erin")]


async def test_killed_node_vanishes_within_ten_seconds(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """kill -9 of a node: its users leave presence and stats within 10 s and the room gets
    user_left for them."""
    a, b = start_node(redis_server.url), start_node(redis_server.url)  # Default lease and grace.
    alice, doomed = await native(a, "alice"), await native(b, "doomed")
    await alice.request({"type": "join", "room": "r", "id": 1})
    await doomed.request({"type": "join", "room": "r", "id": 1})
    assert (await alice.request({"type": "presence", "room": "r", "id": 2}))["count"] == 2
    killed_at = time.monotonic()
    b.kill()

    def gone() -> bool:
        stats = get(a, "/api/stats")["cluster"]
        members = get(a, "/api/rooms/r/members")["members"]
        return b.node_id not in stats["nodes"] and [m["user_id"] for m in members] == ["alice"]

    await wait_for(gone, timeout=10, interval=0.2, what="dead node gone from presence")
    vanished = time.monotonic() - killed_at
    left = await alice.expect("user_left", timeout=15 - vanished)
    assert left["user_id"] == "doomed"
    print(f"dead node vanished after {vanished:.1f}s, user_left after "
          f"{time.monotonic() - killed_at:.1f}s")
    assert get(a, "/api/stats")["cluster"]["rooms"] == {"r": 1}


async def test_clean_shutdown_removes_entries_at_once(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """A node stopped with SIGTERM has removed its presence entries by the time it exits."""
    flags = ("--presence-grace", "0.5", "--rate-burst", "500")
    a = start_node(redis_server.url, *flags)
    b = start_node(redis_server.url, *flags, "--drain-delay", "0", "--drain-window", "0.1")
    alice, bob = await native(a, "alice"), await native(b, "bob")
    await alice.request({"type": "join", "room": "r", "id": 1})
    await bob.request({"type": "join", "room": "r", "id": 1})
    assert await asyncio.to_thread(b.stop) == 0  # SIGTERM; bob answers the closing handshake.
    assert await bob.closed() == 1012
    members = get(a, "/api/rooms/r/members")["members"]
    assert [m["user_id"] for m in members] == ["alice"]
    assert b.node_id not in get(a, "/api/stats")["cluster"]["nodes"]


async def test_reconnect_within_grace_does_not_flap(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """A user who drops and comes back (on another node) within the grace window causes no
    user_left/user_joined; one who stays away leaves after it."""
    a, b = two_nodes(start_node, redis_server, grace="3")
    watcher = await native(a, "watcher")
    await watcher.request({"type": "join", "room": "r", "id": 1})
    erin = await native(a, "erin")  # The barrier: she leaves after dave came back.
    await erin.request({"type": "join", "room": "r", "id": 1})
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "erin")
    dave = await native(a, "dave")
    await dave.request({"type": "join", "room": "r", "id": 1})
    assert await next_presence_event(watcher, timeout=5) == ("user_joined", "dave")
    await dave.close()
    dave = await native(b, "dave")
    await dave.request({"type": "join", "room": "r", "id": 1})
    # erin's user_left is due one grace window after she went, i.e. after the end of the window
    # dave's drop opened (both decided by a's clock): a flap for dave would come before it.
    await erin.close()
    assert await next_presence_event(watcher, timeout=8) == ("user_left", "erin")
    await dave.close()
    assert await next_presence_event(watcher, timeout=8) == ("user_left", "dave")
    assert presence_events(watcher) == [
        ("user_joined", "erin"), ("user_joined", "dave"), ("user_left", "erin"),
        ("user_left", "dave")]


async def test_nick_taken_across_nodes(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """A nick held on one node is refused on the other, and free again once released."""
    a, b = two_nodes(start_node, redis_server)
    first, second = await native(a, "u1"), await native(b, "u2")
    ok = await first.request({"type": "join", "room": "r", "nick": "Zed", "id": 1})
    assert ok["type"] == "joined"
    taken = await second.request({"type": "join", "room": "r", "nick": "zed", "id": 2})
    assert taken["type"] == "error" and taken["code"] == "nick_taken"
    other_room = await second.request({"type": "join", "room": "r2", "nick": "zed", "id": 3})
    assert other_room["type"] == "joined"
    await first.request({"type": "leave", "room": "r", "id": 4})
    again = await second.request({"type": "join", "room": "r", "nick": "zed", "id": 5})
    assert again["type"] == "joined"
    nicks = [m.get("nick") for m in (await second.request(
        {"type": "presence", "room": "r", "id": 6}))["members"]]
    assert nicks == ["zed"]
    # The holder's own user may take it over from a new connection (a reconnect).
    u2_again = await native(a, "u2")
    mine = await u2_again.request({"type": "join", "room": "r", "nick": "Zed", "id": 7})
    assert mine["type"] == "joined"


async def test_tutorial_nick_taken_across_nodes(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """The tutorial chat on '/' is one room cluster-wide: a nick in use on another node is
    refused with close 1008 'nick taken', and chat crosses nodes."""
    a, b = two_nodes(start_node, redis_server)
    ann = await Client.open(a.ws("/"))
    await ann.send({"type": "join", "nick": "ann"})
    await ann.expect("info")
    dup = await Client.open(b.ws("/"))
    await dup.send({"type": "join", "nick": "ANN"})
    assert "taken" in (await dup.expect("error"))["text"]
    assert await dup.closed() == 1008 and dup.ws.close_reason == "nick taken"
    bea = await Client.open(b.ws("/"))
    await bea.send({"type": "join", "nick": "bea"})
    assert "2 present" in (await bea.expect("info"))["text"]
    await bea.send({"type": "chat", "text": "hello from b"})
    assert await ann.expect("chat") == {"type": "chat", "nick": "bea", "text": "hello from b"}


async def test_presence_survives_redis_losing_its_data(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Redis restarted empty: connected users reappear in presence; a leave made while Redis
    was down is applied once it is back."""
    a, b = two_nodes(start_node, redis_server)
    stay, go = await native(a, "stay"), await native(b, "go")
    await stay.request({"type": "join", "room": "r", "id": 1})
    await go.request({"type": "join", "room": "r", "id": 1})
    redis_server.kill()
    left = await go.request({"type": "leave", "room": "r", "id": 2})
    assert left["type"] == "left"
    redis_server.start()

    async def members() -> list[str]:
        reply = await stay.request({"type": "presence", "room": "r", "id": "p"})
        return sorted(m["user_id"] for m in reply.get("members", []))

    async def settled() -> bool:
        return await members() == ["stay"]

    await wait_for(settled, timeout=15, interval=0.3, what="presence re-registered")
    assert get(b, "/api/rooms/r/members")["count"] == 1


async def test_redis_stall_longer_than_the_lease_reaps_no_live_node(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Redis frozen (SIGSTOP) for longer than the node lease: once it answers again, no live
    node is reaped and nobody gets a false user_left; a node that really died meanwhile is."""
    flags = ("--node-lease-ttl", "2", "--presence-grace", "0.5")
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    # The barrier: c dies during the stall, so the reap pass that would wrongly take a live node
    # (its lease lapsed just like c's) is the one that rightly takes c.
    c = start_node(redis_server.url, *flags)
    watcher, other = await native(a, "watcher"), await native(b, "other")
    doomed, erin = await native(c, "doomed"), await native(a, "erin")
    await watcher.request({"type": "join", "room": "r", "id": 1})
    for user in (other, doomed, erin):
        await user.request({"type": "join", "room": "r", "id": 1})
    for name in ("other", "doomed", "erin"):
        assert await next_presence_event(watcher, timeout=5) == ("user_joined", name)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        c.kill()
        # The fault's length, not a synchronisation: longer than the lease (2 s) and the command
        # timeout (5 s), so that refreshes fail rather than wait and every lease lapses.
        await asyncio.sleep(7)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert await next_presence_event(watcher, timeout=15) == ("user_left", "doomed")
    # A user_left that pass scheduled for a live node's user is due no later than erin's.
    await erin.close()
    assert await next_presence_event(watcher, timeout=5) == ("user_left", "erin")
    assert presence_events(watcher) == [
        ("user_joined", "other"), ("user_joined", "doomed"), ("user_joined", "erin"),
        ("user_left", "doomed"), ("user_left", "erin")]
    reaped = [line["dead_node"] for node in (a, b) for line in node.logged("reaped dead node")]
    assert reaped == [c.node_id]
    assert set(get(a, "/api/stats")["cluster"]["nodes"]) == {a.node_id, b.node_id}
    reply = await watcher.request({"type": "presence", "room": "r", "id": 2})
    assert reply["count"] == 2
    assert {m["user_id"] for m in reply["members"]} == {"watcher", "other"}
