"""A 3-node cluster behind real nginx under load: rolling restart and kill -9 lose nothing.

~300 subscribers (node.client.Client, through nginx) in three rooms receive a publisher's
50 msg/s while nodes are replaced or killed. Offsets are gap-free per room, so "every message
exactly once and in order" means: each subscriber's offsets for its room are exactly 1..N.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from roomcast.tools.client import Client, ClientError
from roomcast.tools.cluster import LocalCluster

ROOMS = ("alpha", "beta", "gamma")
SUBSCRIBERS = 300
RATE = 50.0  # messages per second, spread over the rooms
DRAIN = ("--drain-delay", "1", "--drain-window", "3")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    flags = [*DRAIN, "--rate-limit", "1000", "--rate-burst", "2000", "--history-size", "5000",
             "--presence-grace", "2"]
    with LocalCluster(tmp_path / "cluster").start(nodes=3, node_flags=flags) as running:
        yield running


class Load:
    """Subscribers and one publisher, all through the balancer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.subscribers: dict[int, tuple[str, Client]] = {}
        self.received: dict[int, list[int]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.published = 0
        self.stop = asyncio.Event()

    async def start(self) -> None:
        async def open_one(i: int) -> None:
            room = ROOMS[i % len(ROOMS)]
            client = Client(self.url, user_id=f"s{i}", backoff_base=0.2, backoff_cap=2.0)
            await client.connect()
            await client.join(room)
            self.received[i] = []
            self.subscribers[i] = (room, client)
            self.tasks.append(asyncio.create_task(self._consume(i, client)))

        for first in range(0, SUBSCRIBERS, 50):  # Connect in batches, not in one burst.
            await asyncio.gather(*(open_one(i) for i in range(first, first + 50)))
        self.publisher = Client(self.url, user_id="publisher", backoff_base=0.2,
                                backoff_cap=2.0)
        await self.publisher.connect()
        self.tasks.append(asyncio.create_task(self._publish()))

    async def _consume(self, i: int, client: Client) -> None:
        with contextlib.suppress(ClientError):
            async for event in client:
                if event["type"] == "message":
                    self.received[i].append(event["offset"])

    async def _publish(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            room = ROOMS[n % len(ROOMS)]
            with contextlib.suppress(ClientError):  # In flight at a drop: maybe accepted.
                await self.publisher.publish(room, {"n": n, "sent": time.time()})
            n += 1
            self.published = n
            next_at += 1 / RATE
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # Pacing, not a sync.

    async def finish(self) -> dict[str, int]:
        """Stop publishing; wait until every subscriber has its room's last offset."""
        self.stop.set()
        await asyncio.wait_for(self.tasks[-1], 15)
        finals = {}
        for room in ROOMS:
            history = await self.publisher.history(room, limit=1)
            finals[room] = history[-1]["offset"] if history else 0
        # A bounded poll for a positive condition; a shortfall is reported, message by message,
        # by assert_exactly_once_in_order.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(self.received[i] and self.received[i][-1] >= finals[room]
                   for i, (room, _) in self.subscribers.items()):
                break
            await asyncio.sleep(0.1)
        return finals

    async def close(self) -> None:
        for _, client in self.subscribers.values():
            await client.close()
        await self.publisher.close()
        for task in self.tasks:
            task.cancel()


def assert_exactly_once_in_order(load: Load, finals: dict[str, int]) -> None:
    for i, (room, _client) in load.subscribers.items():
        got = load.received[i]
        expected = list(range(1, finals[room] + 1))
        if got != expected:
            missing = sorted(set(expected) - set(got))
            dupes = len(got) - len(set(got))
            raise AssertionError(
                f"subscriber {i} in {room}: {len(got)} received, {len(missing)} missing "
                f"(first {missing[:5]}), {dupes} duplicates, in order: {got == sorted(got)}")


@pytest.mark.timeout(240)
async def test_rolling_restart_under_load_loses_nothing(cluster: LocalCluster) -> None:
    """Rolling restart of all 3 nodes while 300 subscribers receive 50 msg/s: every subscriber
    gets every message once and in order, no handshake fails, each drain ends in time, and the
    reconnects are spread over the drain window."""
    load = Load(cluster.ws_url)
    await load.start()
    try:
        # Pacing, not a synchronisation: let traffic flow before the first node goes.
        await asyncio.sleep(1.0)
        progress: list[str] = []
        old_nodes = list(cluster.nodes)
        started = time.monotonic()
        await asyncio.to_thread(cluster.rolling_restart, progress.append)
        restart_seconds = time.monotonic() - started
        finals = await load.finish()
    finally:
        await load.close()

    assert_exactly_once_in_order(load, finals)
    assert sum(finals.values()) >= 0.8 * RATE * restart_seconds
    assert sum(c.failed_connects for _, c in load.subscribers.values()) == 0
    assert load.publisher.failed_connects == 0
    # All moved: every node was replaced, so every subscriber reconnected at least once.
    assert all(c.reconnects >= 1 for _, c in load.subscribers.values())
    drains = [line for line in progress if "exited with 0 after" in line]
    assert len(drains) == 3, progress
    for line in drains:
        seconds = float(line.split("after ")[1].split(" s")[0])
        assert seconds < 1 + 3 + 5, line  # delay + window + margin
    spreads = []
    for old in old_nodes:
        times = [datetime.fromisoformat(entry["timestamp"]) for entry in old.logged(
            "connection closed") if entry.get("code") == 1012]
        if len(times) > 1:
            spreads.append((max(times) - min(times)).total_seconds())
    print(f"\nrolling restart: {restart_seconds:.1f} s, {sum(finals.values())} messages, "
          f"{SUBSCRIBERS} subscribers; 1012 closes per node spread over "
          f"{', '.join(f'{s:.2f} s' for s in spreads)} (window 3 s)")
    assert spreads and min(spreads) >= 1.5, spreads


@pytest.mark.timeout(180)
async def test_kill_9_under_load_recovers_everything(cluster: LocalCluster) -> None:
    """kill -9 of one node under load: its clients reconnect through nginx to the others and
    recover from history, so every subscriber still gets every message once, in order."""
    load = Load(cluster.ws_url)
    await load.start()
    try:
        # Pacing, not a synchronisation: let traffic flow before the kill.
        await asyncio.sleep(1.5)
        killed = cluster.nodes[0].node_id
        victims = {i for i, (_, c) in load.subscribers.items() if c.node_id == killed}
        cluster.kill_node(0)
        # Pacing, not a synchronisation: keep publishing while the victims come back.
        await asyncio.sleep(4.0)
        finals = await load.finish()
    finally:
        await load.close()
    assert_exactly_once_in_order(load, finals)
    moved = {i for i, (_, c) in load.subscribers.items() if c.reconnects}
    print(f"\nkill -9: {len(moved)} subscribers reconnected, {sum(finals.values())} messages, "
          "0 lost")
    # Exactly the killed node's subscribers moved, each once, to a surviving node.
    assert moved == victims
    assert all(load.subscribers[i][1].reconnects == 1 for i in victims)
    assert all(load.subscribers[i][1].node_id != killed for i in victims)
    assert len(victims) >= SUBSCRIBERS // 6  # least_conn put about a third on the killed node.
