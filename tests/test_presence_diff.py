"""Large rooms get their presence events as presence_diff: one envelope per interval naming who
joined and who left, instead of one user_joined per join to every member."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from roomcast.service.diffs import DIFF_WRITES_PER_SECOND, diff_interval
from tests.harness import Client, NodeProcess, RedisServer, native

FLAGS = ("--presence-diff-above", "3", "--presence-diff-interval", "0.3",
         "--presence-grace", "0.1", "--rate-burst", "500")


async def diffs_until(client: Client, users: set[str], key: str) -> list[dict[str, Any]]:
    """The presence_diff envelopes the client gets until ``users`` were all named in ``key``."""
    seen: set[str] = set()
    got = []
    while not users <= seen:
        env = await client.expect_any(["presence_diff", "user_joined", "user_left"], timeout=10)
        assert env["type"] == "presence_diff", f"a single event in a large room: {env}"
        got.append(env)
        seen |= {entry["user_id"] for entry in env[key]}
    return got


async def test_a_join_storm_in_a_large_room_arrives_as_few_presence_diffs(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Above --presence-diff-above members, 12 users joining across two nodes reach a member as
    presence_diff envelopes (fewer than the joins) that name every one of them once, with
    user_id and username; a later leave arrives in a diff's leaves."""
    a, b = start_node(redis_server.url, *FLAGS), start_node(redis_server.url, *FLAGS)
    watcher = await native(b, "watcher")
    await watcher.request({"type": "join", "room": "big", "id": "j"})
    first = [await native(a, f"u{i}") for i in range(3)]
    for client in first:
        await client.request({"type": "join", "room": "big", "id": "j"})
    # Three single events while the room is small on node b (the watcher alone there).
    for _ in range(3):
        assert (await watcher.expect_any(["user_joined"]))["type"] == "user_joined"
    # Make node b's room large too: three more members there.
    local = [await native(b, f"l{i}") for i in range(3)]
    for client in local:
        await client.request({"type": "join", "room": "big", "id": "j"})
    # While the room grows past the threshold on node b, its events may be single or diffs.
    seen: set[str] = set()
    while not {"l0", "l1", "l2"} <= seen:
        env = await watcher.expect_any(["presence_diff", "user_joined"], timeout=10)
        seen |= ({e["user_id"] for e in env["joins"]} if env["type"] == "presence_diff"
                 else {env["user_id"]})

    storm = [await native(a if i % 2 else b, f"s{i}") for i in range(12)]
    await asyncio.gather(*(c.request({"type": "join", "room": "big", "id": "j"})
                           for c in storm))
    got = await diffs_until(watcher, {f"s{i}" for i in range(12)}, "joins")
    named = [entry["user_id"] for env in got for entry in env["joins"]]
    assert sorted(named) == sorted(f"s{i}" for i in range(12))
    assert len(got) < 12
    assert all(entry["username"] == entry["user_id"] for env in got for entry in env["joins"])

    await storm[0].request({"type": "leave", "room": "big", "id": "l"})
    left = await diffs_until(watcher, {"s0"}, "leaves")
    assert [e["user_id"] for env in left for e in env["leaves"]] == ["s0"]



def test_a_very_large_room_gathers_its_diffs_longer_so_they_cost_a_bounded_rate() -> None:
    """A diff is one write per member: up to 2,500 x --presence-diff-interval members a room
    keeps the flag's interval; beyond, members / 2,500 s, so that a room's diffs never cost a
    node more than 2,500 writes per second however large it grows."""
    assert diff_interval(100, 0.2) == 0.2
    assert diff_interval(500, 0.2) == 0.2
    assert diff_interval(2500, 0.2) == 1.0
    assert diff_interval(10_000, 0.2) == 4.0
    for members in (1, 200, 499, 501, 2500, 50_000):
        interval = diff_interval(members, 0.2)
        assert members / interval <= DIFF_WRITES_PER_SECOND
