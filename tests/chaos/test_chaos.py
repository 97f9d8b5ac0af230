"""Chaos cases: a fault injected into a 2-node cluster while the canary runs; every
acknowledged message reaches every subscriber exactly once, in order, or the subscriber is told
explicitly (``gap`` / ``recovered: false``) where history no longer has it.

Each case: start the cluster and the canary, wait until messages flow (a barrier), inject the
fault, end it, wait until the publisher is acknowledged again and every subscriber caught up
(bounded), then assert lost == dup == reordered == wrong == 0. The quick cases run by default;
the ``chaos`` ones need ROOMCAST_CHAOS=1 (tests/chaos/README.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
from collections.abc import Callable

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.chaos import attackers
from tests.chaos.attackers import RawClient, RssWatch
from tests.chaos.canary import Ack, Canary, Received, Report, Told, account
from tests.chaos.conftest import Cluster
from tests.harness import wait_for

pytestmark = pytest.mark.redis

Record = Callable[[Report], str]
StartCluster = Callable[..., Cluster]


def canary_for(c: Cluster, *, rate: float = 20.0, size: int = 0, per_node: int = 2) -> Canary:
    """The publisher on node a (then b), ``per_node`` subscribers on each node."""
    return Canary([c.a.ws(), c.b.ws()], c.subscriber_urls(), rate=rate, size=size,
                  per_node=per_node)


def check(report: Report, c: Cluster, line: str, *, told_allowed: bool) -> None:
    """The suite's verdict. ``told_allowed`` is False where Redis kept every message: a
    ``gap`` there would tell clients that history lost what it still has."""
    diagnosis = f"{report.details()}\n{c.log_summary()}"
    assert report.acked > 0, f"nothing was acknowledged\n{diagnosis}"
    assert (report.lost, report.dup, report.reordered, report.wrong) == (0, 0, 0, 0), (
        f"{line}\n{diagnosis}")
    assert report.caught_up, f"{line}\n{diagnosis}"
    if not told_allowed:
        assert report.told == 0, f"gap told although Redis kept the data: {line}\n{diagnosis}"


async def conclude(
    canary: Canary, c: Cluster, record: Record, case: str, *, told_allowed: bool,
    after: int = 20, ack_timeout: float = 30.0, catch_up: float = 20.0, **extra: object,
) -> Report:
    """After the fault: ``after`` more acks (bounded), stop, account, print, assert."""
    try:
        await canary.wait_acks_after_fault(after, ack_timeout)
    finally:
        report = await canary.finish(case, catch_up)
        report.extra.update(extra)
        line = record(report)
    check(report, c, line, told_allowed=told_allowed)
    return report


def epochs(canary: Canary) -> int:
    return len({a.epoch for a in canary.publisher.acks})


# --- the accounting itself, without sockets ---------------------------------------------------


def test_accounting_counts_lost_duplicated_reordered_and_wrong() -> None:
    """The rule: not received and not told is lost; a second copy is a duplicate; an older
    message after a newer one is reordered; an offset other than the ack's is wrong."""
    acks = [Ack(i, i, "e1", float(i)) for i in range(1, 7)]
    got = [Received(1, 1, "e1", 1), Received(3, 3, "e1", 3), Received(2, 2, "e1", 3),
           Received(3, 3, "e1", 4), Received(5, 9, "e1", 5)]
    result = account(acks, got, [], fault_end=2.5)
    assert (result.lost, result.duplicated, result.reordered, result.wrong) == (
        [4, 6], [3], [2], [5])
    assert result.received_once == 4
    assert result.recover_s == 0.5
    assert result.live_s is None  # nothing was sent after the fault (Ack.sent defaults to 0)


def test_recovery_times_from_the_fault_end() -> None:
    """recover_s: the first message received after the fault ended; live_s: the first one
    published after it."""
    acks = [Ack(1, 1, "e1", 1.0, sent=0.9), Ack(2, 2, "e1", 5.0, sent=4.0)]
    got = [Received(1, 1, "e1", 3.5), Received(2, 2, "e1", 6.0)]
    result = account(acks, got, [], fault_end=3.0)
    assert (result.recover_s, result.live_s) == (0.5, 3.0)


def test_accounting_gap_covers_lower_offsets_and_older_epochs_only() -> None:
    """A gap at (offset o, epoch e) excuses e's messages up to o and every older epoch's,
    never what comes after it."""
    acks = [Ack(1, 1, "e1", 1), Ack(2, 2, "e1", 2), Ack(3, 1, "e2", 3), Ack(4, 2, "e2", 4),
            Ack(5, 3, "e2", 5)]
    told = [Told("gap", 1, "e2", 6)]
    result = account(acks, [Received(5, 3, "e2", 7)], told)
    assert result.lost == [4]
    assert result.covered == 3
    # An epoch nothing was acknowledged in excuses only what was acknowledged before.
    result = account(acks, [], [Told("recovered_false", 0, "e9", 3.5)])
    assert result.lost == [4, 5]


# --- quick cases: in the default run ------------------------------------------------------------


async def test_pubsub_connections_killed(cluster: StartCluster, record: Record) -> None:
    """CLIENT KILL TYPE pubsub cuts both nodes' pub/sub connections mid-stream: they resubscribe
    and refill from history; nothing lost, duplicated or reordered, and no gap is told."""
    c = cluster()
    canary = canary_for(c)
    try:
        await canary.start()
        await canary.wait_flowing(20)
        named = {client.get("name") for client in c.r.client_list(_type="pubsub")}
        assert {"roomcast:chaos-a:pubsub", "roomcast:chaos-b:pubsub"} <= named, named
        killed = c.r.client_kill_filter(_type="pubsub")
        canary.fault_ended()
        assert killed >= 2, f"expected the two nodes' pub/sub connections, killed {killed}"
        for node in c.nodes:
            await wait_for(lambda n=node: len(n.logged("redis pubsub connected")) >= 2,
                           timeout=10, what=f"{node.node_id} resubscribed")
        await conclude(canary, c, record, "pubsub-kill", told_allowed=False)
    finally:
        await canary.close()


async def test_redis_paused(cluster: StartCluster, record: Record) -> None:
    """redis-server SIGSTOPped for 3 s (under --redis-timeout) then SIGCONTed: publishes wait and
    are acknowledged late; every subscriber gets every ack once, in order, no gap told."""
    c = cluster()
    canary = canary_for(c)
    proc = c.redis.proc
    assert proc is not None
    try:
        await canary.start()
        await canary.wait_flowing(20)
        proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(3.0)  # The fault's length, not a synchronisation.
        finally:
            proc.send_signal(signal.SIGCONT)
        canary.fault_ended()
        await conclude(canary, c, record, "redis-pause", told_allowed=False)
    finally:
        await canary.close()


async def test_redis_data_lost(cluster: StartCluster, record: Record) -> None:
    """FLUSHALL while the canary runs (Redis loses every key, connections stay) and one
    subscriber per node drops its connection: the room starts a new epoch and delivery
    continues; the dropped ones rejoin with a since from the lost epoch; whatever a subscriber
    cannot get back is told explicitly (recovered:false or gap), nothing goes silently."""
    c = cluster()
    canary = canary_for(c)
    try:
        await canary.start()
        await canary.wait_flowing(20)
        c.r.flushall()
        # One subscriber per node also loses its connection now: it rejoins with a since from
        # the lost epoch, so the recovered:false path is exercised too.
        for sub in canary.subscribers[1::2]:
            sub.drop()
        canary.fault_ended()
        await conclude(canary, c, record, "redis-flushall", told_allowed=True)
        assert epochs(canary) >= 2, "the lost history must start a new epoch (PROTOCOL.md 6)"
    finally:
        await canary.close()


async def test_ping_flood(cluster: StartCluster, record: Record) -> None:
    """An attacker on node a sends application pings as fast as it can and never reads: the
    node refuses past the rate limit and closes it 1008; the canary loses nothing."""
    c = cluster(fast=False)  # The product's default rate limit: what an attacker meets.
    canary = canary_for(c, rate=10)
    try:
        await canary.start()
        await canary.wait_flowing(10)
        attacker = await RawClient.open(c.a.port, "/ws?user_id=attacker-ping")
        try:
            flood = await attacker.flood(attackers.text({"type": "ping", "id": 1}),
                                         count=20_000, seconds=10)
            await wait_for(lambda: "attacker-ping" in attackers.node_closes(c.a, "attacker"),
                           timeout=10, what="node a closed the attacker")
        finally:
            attacker.abort()
        canary.fault_ended()
        code = attackers.node_closes(c.a, "attacker")["attacker-ping"]
        await conclude(canary, c, record, "ping-flood", told_allowed=False, after=10,
                       attacker_close=code, attacker_frames=flood.frames)
        assert code == 1008, f"the flooder must be closed 1008 rate limit exceeded, got {code}"
    finally:
        await canary.close()


# --- long cases: ROOMCAST_CHAOS=1 ------------------------------------------------------------


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_redis_killed_and_restarted_empty(cluster: StartCluster, record: Record) -> None:
    """redis-server kill -9, down 2 s (publishes refused: not acknowledged), restarted empty on
    the same port: nodes reconnect and resubscribe; what history lost is told explicitly
    (gap / recovered:false), nothing acknowledged is silently missing."""
    c = cluster()
    canary = canary_for(c)
    try:
        await canary.start()
        await canary.wait_flowing(20)
        c.redis.kill()
        await asyncio.sleep(2.0)  # Downtime: the fault's length.
        c.redis.start()
        canary.fault_ended()
        await conclude(canary, c, record, "redis-kill", told_allowed=True, ack_timeout=40,
                       catch_up=30)
        assert epochs(canary) >= 2, "a Redis that lost its data must start a new epoch"
    finally:
        await canary.close()


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_node_killed(cluster: StartCluster, record: Record) -> None:
    """Node b kill -9: its subscribers reconnect to node a and resume with since from history;
    nothing lost, duplicated or reordered, no gap told."""
    c = cluster()
    canary = canary_for(c)
    try:
        await canary.start()
        await canary.wait_flowing(20)
        c.b.kill()
        canary.fault_ended()
        moved = [s for s in canary.subscribers if s.node == "b"]
        await wait_for(lambda: all(s.connects >= 2 for s in moved), timeout=20,
                       what="node b's subscribers reconnected elsewhere")
        await conclude(canary, c, record, "node-kill", told_allowed=False)
    finally:
        await canary.close()


def pubsub_client_id(c: Cluster, node_id: str) -> str | None:
    for client in c.r.client_list(_type="pubsub"):
        if client.get("name") == f"roomcast:{node_id}:pubsub":
            return str(client["id"])
    return None


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_node_stopped_under_busy_room(cluster: StartCluster, record: Record) -> None:
    """Node b SIGSTOPped 4 s while 10 KB messages flow at 300/s: Redis's pub/sub output buffer
    for b passes its (low) limit and Redis disconnects b. On SIGCONT b reconnects, resubscribes
    and refills from history (large enough to hold the gap); its subscribers, cut as slow
    consumers or not, recover with since. Nothing lost, duplicated or reordered, no gap told."""
    c = cluster("--history-size", "5000", pubsub_limit="1mb 512kb 1")
    canary = canary_for(c, rate=300, size=10_000)
    assert c.b.proc is not None
    try:
        await canary.start()
        await canary.wait_flowing(50)
        before = pubsub_client_id(c, "chaos-b")
        assert before is not None, "node b has no named pub/sub connection"
        c.b.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(4.0)  # The fault's length.
            overflowed = pubsub_client_id(c, "chaos-b") != before
        finally:
            c.b.signal(signal.SIGCONT)
        canary.fault_ended()
        assert overflowed, "Redis did not cut node b's pub/sub connection: no overflow happened"
        await wait_for(lambda: len(c.b.logged("redis pubsub connected")) >= 2, timeout=15,
                       what="node b resubscribed")
        await conclude(canary, c, record, "node-sigstop-busy", told_allowed=False, after=100,
                       catch_up=40, overflow="yes")
    finally:
        c.b.signal(signal.SIGCONT)
        await canary.close()


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_join_burst(cluster: StartCluster, record: Record) -> None:
    """1000 extra clients on node a (connected first, 100 handshakes at a time) send their join
    to the canary's room at once: all are joined within 30 s and the canary loses nothing."""
    c = cluster()
    canary = canary_for(c, rate=10)
    burst = None
    try:
        await canary.start()
        await canary.wait_flowing(10)
        burst = await attackers.join_burst(c.a.port, canary.room, 1000, timeout=30)
        canary.fault_ended()
        await conclude(canary, c, record, "join-burst", told_allowed=False, after=10,
                       burst_joined=burst.joined, burst_s=round(burst.seconds, 1),
                       connect_s=round(burst.connect_seconds, 1),
                       burst_failed=dict(burst.failed) or 0)
        assert burst.joined == 1000, f"joined {burst.joined}/1000; failed {dict(burst.failed)}"
    finally:
        await canary.close()
        if burst is not None:
            await burst.close()


async def preload(c: Cluster, room: str, count: int, size: int) -> None:
    """``count`` messages of ``size`` bytes into ``room``'s history, under the default rate
    limit (each connection stays within its burst)."""
    per = 25

    async def publish(first: int) -> None:
        ws = await connect(c.a.ws(), compression=None, max_size=None)
        try:
            ids = range(first, min(first + per, count))
            for i in ids:
                await ws.send(orjson.dumps(
                    {"type": "publish", "room": room, "data": "y" * size, "id": i}).decode())
            acked = 0
            async with asyncio.timeout(20):
                while acked < len(ids):
                    reply = orjson.loads(await ws.recv())
                    if reply.get("id") in ids:
                        assert reply["type"] == "published", reply
                        acked += 1
        finally:
            await ws.close()

    await asyncio.gather(*(publish(first) for first in range(0, count, per)))


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_non_reading_clients_ask_for_large_history(
    cluster: StartCluster, record: Record,
) -> None:
    """10 clients on node a ask, within the rate limit, for 40 history replies each of a room
    holding 100 messages of 50 KB, and never read: the node cuts them instead of buffering
    ~400 MB for them (RSS growth stays under 150 MB); the canary loses nothing."""
    c = cluster(fast=False)
    await preload(c, "big", 100, 50_000)
    canary = canary_for(c, rate=10)
    hogs: list[RawClient] = []
    assert c.a.proc is not None
    try:
        await canary.start()
        await canary.wait_flowing(10)
        request = b"".join(
            attackers.text({"type": "history", "room": "big", "limit": 100, "id": i})
            for i in range(40))
        async with RssWatch(c.a.proc.pid) as rss:
            for i in range(10):
                hog = await RawClient.open(c.a.port, f"/ws?user_id=hog-{i}")
                hogs.append(hog)
                await hog.send(request)
            with contextlib.suppress(TimeoutError):  # Asserted below, after the report.
                await wait_for(lambda: len(attackers.node_closes(c.a, "hog-")) == 10,
                               timeout=20, what="node a cut every non-reading client")
            closes = attackers.node_closes(c.a, "hog-")
            await asyncio.sleep(0.5)  # One more RSS sample after the cuts.
        canary.fault_ended()
        codes = collections.Counter(str(v) for v in closes.values())
        await conclude(canary, c, record, "large-replies", told_allowed=False, after=10,
                       hogs_closed=f"{len(closes)}/10", hog_codes=dict(codes) or 0,
                       rss_growth_mb=round(rss.growth))
        assert rss.growth < 150, f"node a grew {rss.growth:.0f} MB for 10 non-readers"
        assert len(closes) == 10, f"node a cut {len(closes)}/10 non-readers within 20 s"
    finally:
        for hog in hogs:
            hog.abort()
        await canary.close()


@pytest.mark.chaos
@pytest.mark.timeout(180)
async def test_ping_frame_flood(cluster: StartCluster, record: Record) -> None:
    """An attacker on node a floods WebSocket ping control frames (each costs a token, like any
    frame) and never reads the pongs: the node must not buffer pongs without bound (RSS growth
    under 100 MB) and must close the attacker; the canary loses nothing."""
    c = cluster()
    canary = canary_for(c)
    assert c.a.proc is not None
    try:
        await canary.start()
        await canary.wait_flowing(20)
        attacker = await RawClient.open(c.a.port, "/ws?user_id=attacker-frames")
        try:
            async with RssWatch(c.a.proc.pid) as rss:
                ping = attackers.client_frame(attackers.OP_PING, b"p" * 125)
                # Stopped at 3x the bound: the verdict is clear, the machine need not suffer.
                flood = await attacker.flood(ping, count=5_000_000, seconds=10,
                                             enough=lambda: rss.growth > 300)
                try:
                    await wait_for(
                        lambda: "attacker-frames" in attackers.node_closes(c.a, "attacker"),
                        timeout=10, what="node a closed the ping-frame flooder")
                    closed = True
                except TimeoutError:
                    closed = False
        finally:
            attacker.abort()
        canary.fault_ended()
        code = attackers.node_closes(c.a, "attacker").get("attacker-frames")
        await conclude(canary, c, record, "ping-frame-flood", told_allowed=False,
                       attacker_frames=flood.frames, flood_end=flood.ended,
                       attacker_close=code if closed else "open", rss_growth_mb=round(rss.growth))
        assert rss.growth < 100, f"node a grew {rss.growth:.0f} MB answering a ping flood"
        assert closed, f"node a did not close the ping-frame flooder ({flood})"
    finally:
        await canary.close()
