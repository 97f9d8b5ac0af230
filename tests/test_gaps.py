"""A node that falls behind its Redis pub/sub stream (stopped, then dropped by Redis for an
over-full output buffer) refills what history still holds and tells its members about the rest:
never a silent loss."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.harness import NodeProcess, RedisServer, native, wait_for

BLOB = "x" * 10_000


def pubsub_names(r: redis.Redis) -> set[str]:
    return {c["name"] for c in r.client_list(_type="pubsub")}


@pytest.mark.parametrize(("history_size", "outcome"), [("5000", "refilled"), ("5", "told")])
async def test_output_buffer_overflow_loses_nothing_silently(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess], history_size: str,
    outcome: str,
) -> None:
    """SIGSTOP a node while a busy room streams to it until Redis drops its pub/sub connection
    (client-output-buffer-limit pubsub 1mb); after SIGCONT its member has every acknowledged
    message exactly once, in order, except those a gap event explicitly says it lost."""
    r = redis.Redis.from_url(redis_server.url)
    r.config_set("client-output-buffer-limit", "pubsub 1mb 512kb 1")
    # The refill lands on the member as one burst of up to a few MB: a send buffer that holds it
    # keeps this test about gaps, not about slow consumers (test_node covers those).
    flags = ("--rate-limit", "100000", "--rate-burst", "100000", "--history-size", history_size,
             "--max-send-buffer", "67108864")
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    pub, sub = await native(a, "pub"), await native(b, "sub")
    await sub.request({"type": "join", "room": "busy", "id": "j"})
    acked: list[int] = []
    # The member reads all along, as a live client does (not only once publishing is over).
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def read() -> None:
        while True:
            events.put_nowait(await sub.expect_any(("message", "gap"), timeout=60))

    reader = asyncio.ensure_future(read())

    async def publish(count: int) -> None:
        for _ in range(count):
            ack = await pub.request({"type": "publish", "room": "busy", "data": BLOB,
                                     "id": len(acked)})
            assert ack["type"] == "published", ack
            acked.append(ack["offset"])

    await publish(5)
    b_pubsub = f"roomcast:{b.node_id}:pubsub"
    assert b_pubsub in pubsub_names(r)
    b.signal(signal.SIGSTOP)
    try:
        sent = 0
        while b_pubsub in pubsub_names(r) and sent < 3000:  # Bounded: 30 MB at most.
            await publish(100)
            sent += 100
        assert b_pubsub not in pubsub_names(r), "Redis never dropped the stopped node"
    finally:
        b.signal(signal.SIGCONT)
    await wait_for(lambda: b_pubsub in pubsub_names(r), timeout=15, what="b resubscribed")
    await publish(5)
    last = acked[-1]
    received: list[int] = []
    gaps: list[dict[str, Any]] = []
    while not received or received[-1] < last:
        event = await asyncio.wait_for(events.get(), 15)
        if event["type"] == "gap":
            gaps.append(event)
        else:
            received.append(event["offset"])
    reader.cancel()
    assert received == sorted(set(received)), "duplicated or out of order"
    told = max((g["offset"] for g in gaps), default=0)
    missing = [o for o in acked if o not in set(received)]
    assert all(o <= told for o in missing), f"lost silently: {missing[:5]}..."
    if outcome == "refilled":
        assert gaps == [] and received == acked
        assert b.logged("gap refilled from history")
    else:
        assert len(gaps) == 1 and gaps[0]["recovered"] is False and missing
        assert b.logged("messages lost in a gap, members told")
    print(f"gap {outcome}: acked={len(acked)} received={len(received)} "
          f"told_lost={len(missing)} gaps={len(gaps)}")
