"""Two roomcast nodes on a real three-master Redis Cluster (--redis-cluster): rooms spread over
partitions whose sharded channels live on every master; delivery, history, recovery, presence,
drain and a master's failover, all seen from real clients on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.crc import key_slot
from websockets.exceptions import ConnectionClosed

from roomcast.backends.keys import Keys, partition
from tests.harness import Client, NodeProcess, native, wait_for
from tests.rediscluster import RedisCluster, RedisNode

pytestmark = pytest.mark.redis

StartNode = Callable[..., NodeProcess]

#: --redis-partitions' default, which the nodes run with.
PARTITIONS = 128
#: No publish of these tests is rate limited: they are about delivery, not budgets.
FAST = ("--rate-limit", "100000", "--rate-burst", "100000")


def slot_of(room: str) -> int:
    """The cluster slot of the room's partition: its keys' and its sharded channel's."""
    return key_slot(Keys(partitions=PARTITIONS).channel(room).encode())


def rooms_on_every_master(cluster: RedisCluster, per_master: int) -> list[list[str]]:
    """``per_master`` fresh room names for each master (in masters() order), each room on
    that master by its partition's slot."""
    masters = cluster.masters()
    groups: list[list[str]] = [[] for _ in masters]
    tag = uuid.uuid4().hex[:6]
    for i in range(10_000):
        room = f"r{tag}-{i}"
        owner = cluster.master_of_slot(slot_of(room))
        group = groups[masters.index(owner)]
        if len(group) < per_master:
            group.append(room)
        if all(len(group) == per_master for group in groups):
            return groups
    raise AssertionError("no room names spread over every master")


def same_partition(room: str) -> str:
    """Another room name in ``room``'s partition: both share one sharded channel."""
    for i in range(10_000):
        other = f"{room}-x{i}"
        if partition(other, PARTITIONS) == partition(room, PARTITIONS):
            return other
    raise AssertionError(f"no second room in the partition of {room}")


def keys_of(node: NodeProcess) -> Keys:
    """The Redis names the node uses (its --redis-prefix, partitions on)."""
    return Keys(node.args[node.args.index("--redis-prefix") + 1], PARTITIONS)


def two_nodes(start_node: StartNode, cluster: RedisCluster, *flags: str) -> list[NodeProcess]:
    """Two clustered nodes with a key prefix of this test's own (the cluster is shared)."""
    prefix = f"rc{uuid.uuid4().hex[:8]}"
    return [start_node(cluster.seed_url, "--redis-cluster", "--redis-prefix", prefix, *FAST,
                       "--presence-grace", "0.3", *flags) for _ in range(2)]


class Inbox:
    """Everything a client receives, read all along by a task (as a live client does)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                self.events.append(await self.client.recv(timeout=60))
        except ConnectionClosed:
            self.close_code = self.client.ws.close_code

    def messages(self, room: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "message" and e["room"] == room]

    def gaps(self, room: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "gap" and e["room"] == room]

    def has(self, room: str, data: Any) -> bool:
        return any(m["data"] == data for m in self.messages(room))

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


async def join(client: Client, room: str, **fields: Any) -> dict[str, Any]:
    reply = await client.request({"type": "join", "room": room, "id": f"join-{room}", **fields})
    assert reply["type"] == "joined", reply
    return reply


async def markers(publisher: Client, rooms: list[str], *inboxes: Inbox,
                  timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """Publish a unique marker into every room and wait until every inbox has each one; the
    acks by room. A room's messages arrive in offset order: what was going to arrive before a
    marker has arrived once it is there."""
    acks = {}
    for room in rooms:
        marker = {"marker": uuid.uuid4().hex}
        ack = await publisher.request(
            {"type": "publish", "room": room, "data": marker, "id": marker["marker"]})
        assert ack["type"] == "published", ack
        acks[room] = {**ack, "data": marker}

    def arrived() -> bool:
        return all(inbox.has(r, acks[r]["data"]) for inbox in inboxes for r in rooms)

    await wait_for(arrived, timeout=timeout, what="every room's marker")
    return acks


def assert_exactly_once_in_order(got: list[dict[str, Any]], acked: list[dict[str, Any]]) -> None:
    """The ``got`` messages of a room are exactly the ``acked`` ones (each with the ``data``
    it was published with), once each, in offset order."""
    received = [(m["offset"], m["epoch"], m["data"]) for m in got]
    want = sorted(((a["offset"], a["epoch"], a["data"]) for a in acked), key=lambda t: t[:2])
    assert received == want, f"{len(received)} received, {len(want)} acked"


def script_calls(cluster: RedisCluster) -> int:
    """EVALSHA calls every master has run so far (INFO commandstats)."""
    return sum(int(node.client().info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
               for node in cluster.masters())


@pytest.mark.parametrize("order", ["interleaved", "room by room"])
async def test_every_acked_message_on_every_shard_arrives_once_in_order(
    order: str, redis_cluster: RedisCluster, start_node: StartNode,
) -> None:
    """Rooms whose partitions live on all three masters (two of them sharing one partition):
    publishers on node A pipeline their publishes, and each member on node B gets every
    acknowledged message of every room exactly once, in order. Sent room by room, the
    publishes of one room that wait in one pipeline are merged into one script run (fewer runs
    than publishes), through redis-py's cluster pipeline."""
    groups = rooms_on_every_master(redis_cluster, per_master=2)
    rooms = [room for group in groups for room in group]
    rooms.append(same_partition(rooms[0]))
    a, b = two_nodes(start_node, redis_cluster)
    members = [await native(b, f"member{i}") for i in range(2)]
    for member in members:
        for room in rooms:
            await join(member, room)
    inboxes = [Inbox(member) for member in members]
    # Node B holds one sharded subscription per partition, on the master of its slot.
    keys = keys_of(b)
    for room in rooms:
        owner = redis_cluster.master_of_slot(slot_of(room))
        assert owner.command("PUBSUB", "SHARDNUMSUB", keys.channel(room))[1] == 1, room

    publishers = [await native(a, f"pub{p}") for p in range(2)]
    per_room = 40
    sent: dict[Any, dict[str, Any]] = {}
    sends = [(i, p, room) for i in range(per_room) for p in range(2) for room in rooms]
    if order == "room by room":
        sends.sort(key=lambda send: (send[1], rooms.index(send[2]), send[0]))
    calls = script_calls(redis_cluster)
    for i, p, room in sends:  # Every request sent before any ack is read: pipelined.
        rid = f"{p}-{room}-{i}"
        sent[rid] = {"room": room, "data": {"p": p, "i": i}}
        await publishers[p].send({"type": "publish", "room": room,
                                  "data": sent[rid]["data"], "id": rid})
    acked: dict[str, list[dict[str, Any]]] = {room: [] for room in rooms}
    for publisher in publishers:
        for _ in range(per_room * len(rooms)):
            ack = await publisher.expect_any(("published", "error"), timeout=15)
            assert ack["type"] == "published", ack
            acked[ack["room"]].append({**ack, "data": sent[ack["id"]]["data"]})
    for room in rooms:
        assert sorted(a["offset"] for a in acked[room]) == list(range(1, 2 * per_room + 1))
    if order == "room by room":
        assert script_calls(redis_cluster) - calls < len(sends)

    final = await markers(publishers[0], rooms, *inboxes)
    for inbox in inboxes:
        for room in rooms:
            assert_exactly_once_in_order(inbox.messages(room), [*acked[room], final[room]])
            for p in range(2):  # One publisher's messages keep the order they were sent in.
                mine = [m["data"]["i"] for m in inbox.messages(room)
                        if m["data"].get("p") == p]
                assert mine == list(range(per_room)), (room, p)
        assert not [e for e in inbox.events if e.get("type") == "gap"]
        await inbox.stop()


async def test_history_and_recovery_across_nodes(
    redis_cluster: RedisCluster, start_node: StartNode,
) -> None:
    """On every shard: history lists a room's messages in order (newest with a limit, the
    rest after a ``since``), and a member that rejoins on the other node with ``since`` gets
    exactly the messages it missed, then live ones."""
    rooms = [group[0] for group in rooms_on_every_master(redis_cluster, per_master=1)]
    a, b = two_nodes(start_node, redis_cluster)
    publisher = await native(a, "pub")
    member = await native(b, "member")
    for room in rooms:
        await join(member, room)
    inbox = Inbox(member)
    acked: dict[str, list[dict[str, Any]]] = {room: [] for room in rooms}

    async def publish(count: int) -> None:
        for room in rooms:
            for _ in range(count):
                data = {"n": len(acked[room])}
                ack = await publisher.request({"type": "publish", "room": room, "data": data,
                                               "id": f"{room}-{data['n']}"})
                assert ack["type"] == "published", ack
                acked[room].append({**ack, "data": data})

    await publish(5)
    await wait_for(lambda: all(len(inbox.messages(r)) == 5 for r in rooms), timeout=10,
                   what="the first five messages of every room")
    positions = {r: {"offset": inbox.messages(r)[-1]["offset"],
                     "epoch": inbox.messages(r)[-1]["epoch"]} for r in rooms}
    await inbox.stop()
    await member.close()
    await publish(7)  # Missed by the member, offline.

    reader = await native(b, "reader")
    for room in rooms:
        everything = [(a["offset"], a["data"]) for a in acked[room]]
        full = await reader.request({"type": "history", "room": room, "id": "h1"})
        assert [(m["offset"], m["data"]) for m in full["messages"]] == everything
        assert full["offset"] == 12 and "recovered" not in full
        newest = await reader.request({"type": "history", "room": room, "limit": 3, "id": "h2"})
        assert [(m["offset"], m["data"]) for m in newest["messages"]] == everything[-3:]
        after = await reader.request({"type": "history", "room": room,
                                      "since": positions[room], "id": "h3"})
        assert after["recovered"] is True
        assert [(m["offset"], m["data"]) for m in after["messages"]] == everything[5:]
        stale = await reader.request({"type": "history", "room": room, "id": "h4",
                                      "since": {"offset": 3, "epoch": "00000000"}})
        assert stale["recovered"] is False and stale["messages"] == []

    back = await native(a, "member")  # The other node this time.
    for room in rooms:
        joined = await join(back, room, since=positions[room])
        assert joined["recovered"] is True and joined["offset"] == 12
    inbox = Inbox(back)
    await wait_for(lambda: all(len(inbox.messages(r)) == 7 for r in rooms), timeout=10,
                   what="the seven missed messages of every room")
    final = await markers(publisher, rooms, inbox)
    for room in rooms:
        assert_exactly_once_in_order(inbox.messages(room), [*acked[room][5:], final[room]])
    await inbox.stop()


async def test_presence_across_nodes(redis_cluster: RedisCluster, start_node: StartNode) -> None:
    """On every shard: a room's presence, asked on either node, lists the members of both
    nodes; a member on node B that leaves is announced to node A's member with user_left and
    is gone from presence."""
    rooms = [group[0] for group in rooms_on_every_master(redis_cluster, per_master=1)]
    a, b = two_nodes(start_node, redis_cluster)
    alice, bob = await native(a, "alice"), await native(b, "bob")
    for room in rooms:
        await join(alice, room)
    for room in rooms:
        await join(bob, room)
        joined = await alice.expect("user_joined", room=room)
        assert joined["user_id"] == "bob"

    def members(reply: dict[str, Any]) -> list[tuple[str, str]]:
        return sorted((m["user_id"], m["node_id"]) for m in reply["members"])

    for room in rooms:
        for asker in (alice, bob):
            reply = await asker.request({"type": "presence", "room": room, "id": "p"})
            assert members(reply) == [("alice", a.node_id), ("bob", b.node_id)], reply
            assert reply["count"] == 2
    for room in rooms:
        assert (await bob.request({"type": "leave", "room": room, "id": "l"}))["type"] == "left"
    for room in rooms:
        left = await alice.expect("user_left", room=room, timeout=5)
        assert left["user_id"] == "bob"
        for asker in (alice, bob):
            reply = await asker.request({"type": "presence", "room": room, "id": "p"})
            assert members(reply) == [("alice", a.node_id)] and reply["count"] == 1


def post_drain(node: NodeProcess, token: str) -> int:
    request = urllib.request.Request(f"{node.api}/admin/drain", method="POST",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return int(reply.status)


async def test_drain_hands_members_to_the_other_node_losing_nothing(
    redis_cluster: RedisCluster, start_node: StartNode,
) -> None:
    """POST /admin/drain on node A while node B's publisher keeps publishing to rooms on
    every shard: A's members get a 'reconnect' hint then close 1012; rejoining on node B with
    the hint's positions, each has every acknowledged message exactly once, in order."""
    rooms = [group[0] for group in rooms_on_every_master(redis_cluster, per_master=1)]
    token = uuid.uuid4().hex
    a, b = two_nodes(start_node, redis_cluster, "--drain-delay", "0.3", "--drain-window",
                     "0.6", "--admin-token", token)
    members = [await native(a, f"member{i}") for i in range(3)]
    for member in members:
        for room in rooms:
            await join(member, room)
    inboxes = [Inbox(member) for member in members]
    publisher = await native(b, "pub")
    acked: dict[str, list[dict[str, Any]]] = {room: [] for room in rooms}
    stop = asyncio.Event()

    async def publish() -> None:
        n = 0
        while not stop.is_set():
            room = rooms[n % len(rooms)]
            data = {"n": n}
            ack = await publisher.request({"type": "publish", "room": room, "data": data,
                                           "id": n})
            assert ack["type"] == "published", ack
            acked[room].append({**ack, "data": data})
            n += 1
            await asyncio.sleep(0.005)  # A steady stream, not a flood.

    stream = asyncio.ensure_future(publish())
    await wait_for(lambda: all(len(i.messages(r)) >= 3 for i in inboxes for r in rooms),
                   timeout=10, what="a few messages of every room on node A")
    assert post_drain(a, token) == 202
    await wait_for(lambda: all(i.close_code is not None for i in inboxes), timeout=10,
                   what="node A's members closed")
    assert a.wait(timeout=10) == 0

    rejoined = []
    for i, inbox in enumerate(inboxes):
        assert inbox.close_code == 1012
        # The hint is the last thing before the close, and names where each room stood.
        hint = inbox.events[-1]
        assert hint["type"] == "reconnect", inbox.events[-3:]
        assert 0 <= hint["retry_after_ms"] <= 1000
        for room in rooms:
            last = inbox.messages(room)[-1]
            assert hint["rooms"][room] == {"offset": last["offset"], "epoch": last["epoch"]}
        back = await native(b, f"member{i}")
        for room in rooms:
            joined = await join(back, room, since=hint["rooms"][room])
            assert joined["recovered"] is True, joined
        rejoined.append(Inbox(back))
    await wait_for(lambda: all(len(i.messages(r)) >= 3 for i in rejoined for r in rooms),
                   timeout=10, what="messages on node B after the rejoin")
    stop.set()
    await asyncio.wait_for(stream, 10)
    final = await markers(publisher, rooms, *rejoined)
    for before, after in zip(inboxes, rejoined, strict=True):
        for room in rooms:  # Node A's messages, then node B's replay and live ones.
            assert_exactly_once_in_order(before.messages(room) + after.messages(room),
                                         [*acked[room], final[room]])
        await after.stop()
    print(f"drain: {sum(len(v) for v in acked.values())} messages published meanwhile")


async def kill(cluster: RedisCluster, victim: RedisNode) -> RedisNode:
    """SIGKILL the master; its replica is promoted."""
    cluster.kill_master(victim)
    return await asyncio.to_thread(cluster.wait_failover, victim)


#: How long ``stall`` keeps the master stopped: past its replica's promotion (about 2-3 s) and
#: the node's rerouting of publishes to the promoted replica (a --redis-timeout of 2 s, twice),
#: but before the node's idle pub/sub PING (after 5 s of silence) times out and resubscribes.
STALL = 5.0


async def stall(cluster: RedisCluster, victim: RedisNode) -> RedisNode:
    """SIGSTOP the master (a stalled host) until its replica is promoted and has taken
    publishes, then SIGCONT it: it comes back, for a moment still a master in its own eyes,
    and becomes a replica of the promoted one."""
    stopped = time.monotonic()
    cluster.pause_master(victim)
    promoted = await asyncio.to_thread(cluster.wait_failover, victim)
    await asyncio.sleep(max(0.5, STALL - (time.monotonic() - stopped)))
    await asyncio.to_thread(cluster.resume, victim)
    return promoted


@pytest.mark.parametrize("fault", [
    pytest.param(kill, id="kill"),
    pytest.param(stall, id="stall"),
])
async def test_failover(
    redis_cluster_with_replicas: RedisCluster, start_node: StartNode,
    fault: Callable[[RedisCluster, RedisNode], Awaitable[RedisNode]],
) -> None:
    """A master fails while a publisher streams to rooms on every shard, and its replica takes
    over: every publish gets an ack or an 'unavailable' error (after a kill at most the one in
    flight as the cluster came back is still delivered, once; after a stall the deposed master
    may still run refused ones, once each, and the nodes then find history holding another
    message where they delivered it, start a new epoch and send a gap); every acked message
    reaches the members on both nodes exactly once, in order, unless a gap told them; the
    nodes resubscribe on the new master and delivery resumes in every room."""
    cluster = redis_cluster_with_replicas
    groups = rooms_on_every_master(cluster, per_master=2)
    rooms = [room for group in groups for room in group]
    victim = cluster.master_of_slot(slot_of(groups[0][0]))
    a, b = two_nodes(start_node, cluster, "--redis-timeout", "2")
    publisher = await native(a, "pub")
    members = [await native(a, "member-a"), await native(b, "member-b")]
    for member in members:
        for room in rooms:
            await join(member, room)
    inboxes = [Inbox(member) for member in members]
    acked: dict[str, list[dict[str, Any]]] = {room: [] for room in rooms}
    refused: list[tuple[float, int, dict[str, Any]]] = []  # (s after the fault, n, reply)
    acks_after_fault: list[float] = []
    total, fault_at, interval = 300, 60, 0.02  # A steady 50 publishes a second.
    # Past ``total`` while the last 20 replies were not all acks: the failover and the nodes'
    # reconnect (backoff with jitter) may outlast the 5 s of the first 240 on a loaded machine.
    # Bounded: at most 900 publishes, 18 s at this pace.
    most, streak = 900, 0
    started = 0.0
    failover: asyncio.Future[RedisNode] | None = None
    n = -1
    while n + 1 < total or (streak < 20 and n + 1 < most):
        n += 1
        if n == fault_at:
            started = time.monotonic()
            failover = asyncio.ensure_future(fault(cluster, victim))
            await asyncio.sleep(0)  # The fault's first, synchronous step happens now.
        room = rooms[n % len(rooms)]
        reply = await publisher.request(
            {"type": "publish", "room": room, "data": {"n": n}, "id": n}, timeout=15)
        after = time.monotonic() - started
        if reply["type"] == "published":
            acked[room].append({**reply, "data": {"n": n}})
            streak += 1
            if started:
                acks_after_fault.append(after)
        else:
            assert started, f"refused before the fault: {reply}"
            refused.append((after, n, reply))
            streak = 0
        await asyncio.sleep(interval)
    assert failover is not None
    promoted = await asyncio.wait_for(failover, 30)

    # Refused publishes said so, with the code a client retries on, and only during the outage.
    assert refused, "no publish was refused: the fault went unnoticed?"
    assert {reply["code"] for _, _, reply in refused} == {"unavailable"}, refused[:3]
    last_refusal = max(t for t, _, _ in refused)
    resumed = min(t for t in acks_after_fault if t > last_refusal)
    final = await markers(publisher, rooms, *inboxes, timeout=15)  # Delivery resumed.
    # Both nodes subscribed again on the fresh topology: the promoted replica carries the
    # victim's partitions' channels, each master its own.
    keys = keys_of(a)
    for room in rooms:
        owner = cluster.master_of_slot(slot_of(room))
        assert owner.command("PUBSUB", "SHARDNUMSUB", keys.channel(room))[1] == 2, room
    assert promoted.owns(slot_of(groups[0][0]))
    for node in (a, b):
        assert len(node.logged("redis pubsub connected")) >= 2, node.output()[-3000:]

    refused_data = {n for _, n, _ in refused}
    gaps = 0
    delivered_refused: set[int] = set()
    for inbox, node in zip(inboxes, (a, b), strict=True):
        for room in rooms:
            got = inbox.messages(room)
            positions = [(m["epoch"], m["offset"]) for m in got]
            assert len(positions) == len(set(positions)), f"{room}: a message arrived twice"
            numbers = [m["data"]["n"] for m in got if "n" in m["data"]]
            assert numbers == sorted(set(numbers)), f"{room}: out of order or twice"
            received = {(m["epoch"], m["offset"], str(m["data"])) for m in got}
            told = inbox.gaps(room)
            gaps += len(told)
            for ack in [*acked[room], final[room]]:
                if (ack["epoch"], ack["offset"], str(ack["data"])) in received:
                    continue
                assert any(g["epoch"] != ack["epoch"] or g["offset"] >= ack["offset"]
                           for g in told), (f"{node.node_id} {room}: acked {ack} lost "
                                            f"silently; gaps {told}\n{node.output()[-3000:]}")
            # A refused publish was not acknowledged. Most are refused before they leave the
            # node (its pub/sub is down: nothing is sent). After a kill, the one in flight as
            # the cluster came back may have run on the promoted master with its answer lost
            # in redis-py's cluster pipeline; after a stall, the deposed master may run ones
            # that timed out here once it resumes. Such a message arrives at most once and in
            # order (above).
            delivered_refused |= refused_data & set(numbers)
        await inbox.stop()
    if fault is kill:
        # One publisher, one publish in flight: at most one refusal can have been sent.
        assert len(delivered_refused) <= 1, f"refused publishes delivered: {delivered_refused}"
    assert cluster.last_failover is not None
    print(f"failover ({fault.__name__}): {cluster.last_failover.how}, "
          f"{cluster.last_failover.seconds:.1f}s to a healthy cluster; {len(refused)} of "
          f"{n + 1 - fault_at} publishes after the fault refused 'unavailable', from "
          f"{refused[0][0]:.2f}s to {last_refusal:.2f}s after it; acks again from "
          f"{resumed:.2f}s; refused but delivered: {sorted(delivered_refused)}; gap notices: "
          f"{gaps}; refills: "
          f"{[len(node.logged('gap refilled from history')) for node in (a, b)]}")
