"""Draining a node: readiness off, 503 to handshakes, paced reconnect + 1012, exit in time."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from roomcast.transports.drain import BATCH_INTERVAL, batch_plan
from tests.harness import Client, NodeProcess, RedisServer, native, wait_for


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def logged_at(line: dict[str, Any]) -> float:
    """The node's own timestamp of a log line, in seconds."""
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def batches(times: list[float], gap: float) -> list[list[float]]:
    """``times`` (sorted) grouped into runs whose neighbours are less than ``gap`` apart."""
    groups: list[list[float]] = []
    for t in times:
        if groups and t - groups[-1][-1] < gap:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def test_batch_plan_spreads_closes_over_the_window() -> None:
    """Closes are split into batches across the window, never one batch for many clients."""
    assert batch_plan(0, 10) == []
    assert batch_plan(3, 10) == [1, 1, 1]
    plan = batch_plan(1000, 10)
    assert len(plan) == 100 and sum(plan) == 1000 and max(plan) == 10
    assert batch_plan(5, 0) == [5]  # A zero window still closes everyone.


async def test_drain_hands_clients_off_with_reconnect_and_1012(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """SIGTERM: readiness 503 and handshakes 503 at once; after the delay each client gets a
    'reconnect' hint with its rooms' positions, then close 1012, paced over the window; the
    node exits 0 within delay + window + margin and removes its presence."""
    delay, window = 1.0, 2.0
    node = start_node(redis_server.url, "--drain-delay", str(delay), "--drain-window",
                      str(window), "--rate-burst", "500")
    other = start_node(redis_server.url)
    clients = [await native(node, f"u{i}") for i in range(20)]
    for client in clients:
        await client.request({"type": "join", "room": "d", "id": 1})
    ack = await clients[0].request({"type": "publish", "room": "d", "data": "x", "id": 2})
    assert ack["type"] == "published", ack
    for client in clients:
        await client.expect("message")

    started = time.monotonic()
    node.signal(signal.SIGTERM)
    await wait_for(lambda: status(f"{node.http}/readyz") == 503, timeout=2,
                   what="readiness off")
    with pytest.raises(InvalidStatus) as refused:
        await Client.open(node.ws("/ws?user_id=late"))
    assert refused.value.response.status_code == 503

    hints = await asyncio.gather(*(c.expect("reconnect", timeout=delay + window + 5)
                                   for c in clients))
    codes = await asyncio.gather(*(c.closed() for c in clients))
    assert set(codes) == {1012}
    for hint in hints:
        assert hint["rooms"] == {"d": {"offset": ack["offset"], "epoch": ack["epoch"]}}
        assert 0 <= hint["retry_after_ms"] <= 1000
    assert node.wait(timeout=delay + window + 10) == 0
    elapsed = time.monotonic() - started
    assert elapsed < delay + window + 5, f"drain took {elapsed:.1f}s"
    # Paced, by the node's own clock: none before the delay, then batches across the window.
    closes = node.logged("connection closed")
    assert [line["code"] for line in closes] == [1012] * 20
    [drain_started] = node.logged("drain started")
    close_times = sorted(logged_at(line) for line in closes)
    assert close_times[0] - logged_at(drain_started) >= delay - 0.01  # Clock granularity.
    span = close_times[-1] - close_times[0]
    # The last batch is scheduled (len(plan) - 1) / len(plan) of the way into the window: 1.9 s.
    assert span >= 0.75 * window, f"closes spread over {span:.2f}s of a {window}s window"
    planned = len(batch_plan(20, window))  # 20 batches of one, BATCH_INTERVAL apart.
    runs = batches(close_times, gap=BATCH_INTERVAL / 2)
    assert len(runs) >= planned // 2, [len(run) for run in runs]
    reader = await native(other, "reader")
    members = await reader.request({"type": "presence", "room": "d", "id": 3})
    assert members["count"] == 0


async def test_second_sigterm_closes_the_rest_with_1001(
    start_node: Callable[..., NodeProcess],
) -> None:
    """A second SIGTERM during the drain delay closes every client at once with 1001."""
    node = start_node(None, "--drain-delay", "30", "--drain-window", "30")
    clients = [await native(node, f"u{i}") for i in range(5)]
    node.signal(signal.SIGTERM)
    await wait_for(lambda: node.logged("drain started"), timeout=5, what="drain start")
    node.signal(signal.SIGTERM)
    codes = await asyncio.gather(*(c.closed(timeout=10) for c in clients))
    assert set(codes) == {1001}
    assert node.wait(timeout=10) == 0


async def test_stop_drops_a_client_that_does_not_read_within_the_close_timeout(
    start_node: Callable[..., NodeProcess],
) -> None:
    """A second SIGTERM closes everyone with 1001 within --close-timeout: a member that stopped
    reading with megabytes waiting for it (not a slow consumer yet: --max-send-buffer is
    larger) cannot finish its closing handshake, and is dropped when that time is up instead
    of outliving the node's shutdown (its handler ends, and is not cancelled at the exit)."""
    node = start_node(None, "--drain-delay", "30", "--close-timeout", "1", "--ping-interval",
                      "0", "--max-send-buffer", str(64 << 20), "--rate-limit", "100000",
                      "--rate-burst", "100000", "--max-message-size", "1048576")
    stuck, fast, pub = (await native(node, "stuck"), await native(node, "fast"),
                        await native(node, "pub"))
    for client in (stuck, fast):
        await client.request({"type": "join", "room": "r", "id": 1})
    conn_id = stuck.seen[0]["conn_id"]  # Its welcome.
    stuck.ws.transport.pause_reading()  # For good: the kernel's buffers fill, then the node's.
    blob = "x" * 16384
    for sent in range(1, 1001):  # 16 MB, more than the kernel's socket buffers hold.
        await pub.send({"type": "publish", "room": "r", "data": blob})
        if sent % 50 == 0:  # Paced by the member that reads.
            for _ in range(50):
                await fast.expect("message", timeout=10)
    assert not node.logged("closing slow consumer")
    node.signal(signal.SIGTERM)
    await wait_for(lambda: node.logged("drain started"), timeout=5, what="drain start")
    node.signal(signal.SIGTERM)
    assert await fast.closed(timeout=10) == 1001
    assert node.wait(timeout=15) == 0
    events = [(line.get("event"), line.get("conn_id"), line.get("code")) for line in node.lines]
    closed = events.index(("connection closed", conn_id, 1001))
    # Before the node stopped, not when the loop was torn down under its handler.
    assert closed < [event for event, _, _ in events].index("node stopped")


async def test_admin_drain_needs_the_token(start_node: Callable[..., NodeProcess]) -> None:
    """POST /admin/drain with the bearer token starts a drain; a wrong token gets 401."""
    node = start_node(None, "--admin-token", "s3cret", "--drain-delay", "0.2",
                      "--drain-window", "0.2")

    def post(token: str) -> int:
        request = urllib.request.Request(f"{node.api}/admin/drain", method="POST",
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    client = await native(node, "u")
    assert post("wrong") == 401
    assert status(f"{node.http}/readyz") == 200
    assert post("s3cret") == 202
    assert await client.closed() == 1012
    assert node.wait(timeout=10) == 0
