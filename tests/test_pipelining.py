"""Pipelined publishes and batched fan-out (commit 45e9151) on real nodes over loopback: a
connection's publishes in flight at once, answered in request order; Redis pipelines that
survive SCRIPT FLUSH; a room's messages handed to its members once per flush, with recovery,
typing and the slow-consumer cut still exact."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from roomcast.backends.redis_common import load_script
from tests.harness import Client, NodeProcess, RedisServer, barrier, native, wait_for

StartNode = Callable[..., NodeProcess]

#: No publish of these tests is rate limited: they are about order, not about budgets.
FAST = ("--rate-limit", "100000", "--rate-burst", "100000")


def two_nodes(start_node: StartNode, redis: RedisServer, *flags: str) -> list[NodeProcess]:
    return [start_node(redis.url, *FAST, *flags) for _ in range(2)]


def publish(room: str, data: Any, rid: Any = None) -> dict[str, Any]:
    request: dict[str, Any] = {"type": "publish", "room": room, "data": data}
    if rid is not None:
        request["id"] = rid
    return request


async def join(client: Client, room: str, **fields: Any) -> dict[str, Any]:
    reply = await client.request({"type": "join", "room": room, "id": f"join-{room}", **fields})
    assert reply["type"] == "joined", reply
    return reply


async def collect(client: Client, count: int, keep: Callable[[dict[str, Any]], bool],
                  timeout: float = 20.0) -> list[dict[str, Any]]:
    """The next ``count`` envelopes that ``keep`` accepts (the others are skipped), all within
    ``timeout`` seconds."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            message = await client.recv(timeout)
            if keep(message):
                got.append(message)
    return got


async def answers(client: Client, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The next ``count`` replies (envelopes with an ``id``), in the order they arrived."""
    return await collect(client, count, lambda m: "id" in m, timeout)


async def messages(client: Client, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The next ``count`` ``message`` envelopes, in the order they arrived."""
    return await collect(client, count, lambda m: m["type"] == "message", timeout)


async def until_marker(client: Client, marker: Any, timeout: float = 20.0) -> list[
        dict[str, Any]]:
    """Every envelope up to and including the ``message`` whose data is ``marker``."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not got or got[-1].get("data") != marker:
            got.append(await client.recv(timeout))
    return got


def consecutive(offsets: list[int]) -> bool:
    return bool(offsets) and offsets == list(range(offsets[0], offsets[0] + len(offsets)))


# --- 1. read-ahead keeps order --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cluster", "embedded"])
async def test_a_thousand_back_to_back_publishes_are_acked_and_delivered_in_order(
    mode: str, start_node: StartNode, request: pytest.FixtureRequest,
) -> None:
    """1000 publishes sent without waiting: the acks come in request order with consecutive
    offsets, and a member (on the other node in a cluster) gets each acked message once, in
    order, at its acked offset."""
    if mode == "cluster":
        a, b = two_nodes(start_node, request.getfixturevalue("redis_server"))
    else:
        a = b = start_node(None, *FAST)
    member = await native(b, "member")
    await join(member, "r")
    pub = await native(a, "pub")
    count = 1000
    for i in range(count):
        await pub.send(publish("r", {"n": i}, i))
    acks = await answers(pub, count)
    assert [(m["type"], m["id"]) for m in acks] == [("published", i) for i in range(count)]
    assert [m["offset"] for m in acks] == list(range(1, count + 1))
    assert {m["epoch"] for m in acks} == {acks[0]["epoch"]}
    got = await messages(member, count)
    # The canary: every acknowledged publish reached the member, at the offset its ack named.
    assert [(m["data"]["n"], m["offset"], m["epoch"]) for m in got] == [
        (i, ack["offset"], ack["epoch"]) for i, ack in enumerate(acks)]
    # Exactly once: the next message the member gets is a marker published after them.
    assert (await barrier(pub, "r", member))["offset"] == count + 1


def read_count(node: NodeProcess, kind: str) -> float:
    """roomcast_messages_in{type=kind}: frames of that type the node has read and decoded."""
    with urllib.request.urlopen(f"{node.api}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    prefix = f'roomcast_messages_in_total{{type="{kind}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


@contextmanager
def stopped(redis: RedisServer) -> Iterator[None]:
    """Redis SIGSTOPped (it holds its connections, answers nothing) until the block ends."""
    assert redis.proc is not None
    redis.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        redis.proc.send_signal(signal.SIGCONT)


async def test_read_ahead_holds_at_most_a_megabyte_of_large_publishes_while_redis_stalls(
    start_node: StartNode, redis_server: RedisServer,
) -> None:
    """A connection publishing 60 KB messages while Redis does not answer: the node reads
    ahead only as far as PUBLISH_WINDOW_BYTES (1 MiB: 17 in flight, the 18th read and
    waiting), not PUBLISH_WINDOW (1024) messages; once Redis is back every one is acked, in
    order, and reaches the member exactly once."""
    node = start_node(redis_server.url, *FAST, "--redis-timeout", "20")
    member = await native(node, "member")
    await join(member, "r")
    pub = await native(node, "pub")
    blob, count = "x" * 60_000, 40  # Frames of about 60,050 bytes.
    with stopped(redis_server):
        for i in range(count):
            await pub.send(publish("r", {"n": i, "blob": blob}, i))
        await wait_for(lambda: read_count(node, "publish") >= 18, what="18 publishes read")
        # Barrier: another connection's request served after those frames arrived; the
        # stalled connection's reading stopped at the bound meanwhile.
        other = await native(node, "other")
        assert (await other.request({"type": "ping", "id": "p"}))["type"] == "pong"
        assert read_count(node, "publish") == 18
    acks = await answers(pub, count, timeout=30)
    assert [(m["type"], m["id"]) for m in acks] == [("published", i) for i in range(count)]
    got = await messages(member, count, timeout=30)
    assert [(m["data"]["n"], m["offset"]) for m in got] == [
        (i, ack["offset"]) for i, ack in enumerate(acks)]
    assert (await barrier(pub, "r", member))["offset"] == acks[-1]["offset"] + 1


# --- 2. other requests wait for the publishes before them -----------------------------------


@pytest.mark.parametrize("kind", ["ping", "presence"])
async def test_a_request_after_a_burst_is_answered_after_every_ack(
    kind: str, start_node: StartNode, redis_server: RedisServer,
) -> None:
    """A ping or presence request sent right behind 200 publishes is answered after all 200
    acks, which come in request order."""
    a, b = two_nodes(start_node, redis_server)
    member = await native(b, "member")
    await join(member, "r")
    pub = await native(a, "pub")
    count = 200
    for i in range(count):
        await pub.send(publish("r", i, i))
    await pub.send({"type": kind, "room": "r", "id": "after"})
    replies = await answers(pub, count + 1)
    assert [m["id"] for m in replies] == [*range(count), "after"]
    assert [m["type"] for m in replies] == ["published"] * count + [
        "pong" if kind == "ping" else "presence"]
    assert [m["offset"] for m in replies[:count]] == list(range(1, count + 1))
    if kind == "presence":
        assert [m["user_id"] for m in replies[-1]["members"]] == ["member"]
    assert [m["data"] for m in await messages(member, count)] == list(range(count))


# --- 3. an invalid publish in a burst ---------------------------------------------------------

NAMESPACES = """\
[default]
join = "anyone"

[namespaces.ro]
join = "anyone"
publish = "server"
"""


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("case", [
    pytest.param("forbidden room", id="forbidden"),
    pytest.param("invalid room", id="invalid-room"),
    pytest.param("data too deep", id="data-too-deep"),
])
async def test_an_invalid_publish_in_a_burst_is_answered_in_its_place(
    case: str, start_node: StartNode, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """The error of the 51st of 100 publishes (forbidden room, invalid room name, data nested
    too deep) comes between the acks of its neighbours, and the 99 valid ones are delivered
    once, in order."""
    spaces = tmp_path / "namespaces.toml"
    spaces.write_text(NAMESPACES)
    a, b = two_nodes(start_node, redis_server, "--namespaces-file", str(spaces))
    member = await native(b, "member")
    await join(member, "r")
    pub = await native(a, "pub")
    await join(pub, "r")  # Publishing in the default namespace is for its members.
    count, bad = 100, 50
    invalid, code = {
        "forbidden room": (publish("ro:x", bad, bad), "forbidden"),
        "invalid room": (publish("no spaces here", bad, bad), "bad_request"),
        "data too deep": (publish("r", nested(65), bad), "bad_request"),
    }[case]
    for i in range(count):
        await pub.send(invalid if i == bad else publish("r", i, i))
    replies = await answers(pub, count)
    valid = [i for i in range(count) if i != bad]
    got = await messages(member, count - 1)
    assert [m["data"] for m in got] == valid
    assert consecutive([m["offset"] for m in got])
    await barrier(pub, "r", member)
    by_id = {m["id"]: m for m in replies}
    assert (by_id[bad]["type"], by_id[bad]["code"]) == ("error", code), by_id[bad]
    assert [m["offset"] for m in got] == [by_id[i]["offset"] for i in valid]
    place = [m["id"] for m in replies].index(bad)
    assert [m["id"] for m in replies] == list(range(count)), (
        f"the error of publish {bad} came as reply {place}")


# --- 4. Redis loses its scripts mid-burst -----------------------------------------------------


@pytest.mark.parametrize("rooms", [("r",), ("r", "s")], ids=["one room", "two rooms, turn about"])
async def test_script_flush_during_a_burst_loses_and_duplicates_nothing_acked(
    rooms: tuple[str, ...], start_node: StartNode, redis_server: RedisServer,
    redis_client: aioredis.Redis,
) -> None:
    """SCRIPT FLUSH in the middle of each of ten bursts of 200 publishes from one connection:
    the node loads the script again and reruns what failed, so all 2000 are acked, in order,
    and the member on the other node gets each of them exactly once, in order. In one room a
    pipeline's publishes are one or two calls of the script (merged runs); in two rooms taken
    turn about, each publish is a call of its own, several per room in one pipeline."""
    a, b = two_nodes(start_node, redis_server)
    member = await native(b, "member")
    for room in rooms:
        await join(member, room)
    pub = await native(a, "pub")
    # One publish first: Redis has the script before the bursts. (On a fresh Redis the first
    # pipeline gets NOSCRIPT too, and a flush between that reload and the rerun is a second
    # loss of the script, which the node answers with 'unavailable': nothing stored.)
    for room in rooms:
        await barrier(pub, room, member)
    rounds, half = 10, 100
    blob = "x" * 200  # Longer pipelines: more chance that a flush lands inside one.
    sha = hashlib.sha1(load_script("publish").encode()).hexdigest()
    replies: list[dict[str, Any]] = []
    for n in range(rounds):
        first = n * 2 * half
        # Half the burst is in flight (read ahead, pipelined) when the flush runs; the other
        # half reaches Redis after it, so every round makes the node reload the script.
        for i in range(first, first + half):
            await pub.send(publish(rooms[i % len(rooms)], {"n": i, "blob": blob}, i))
        assert await redis_client.script_flush()
        for i in range(first + half, first + 2 * half):
            await pub.send(publish(rooms[i % len(rooms)], {"n": i, "blob": blob}, i))
        replies += await answers(pub, 2 * half)
        assert await redis_client.script_exists(sha) == [True]  # Reloaded by the node.
    count = rounds * 2 * half
    assert [m["id"] for m in replies] == list(range(count))
    refused = [m for m in replies if m["type"] != "published"]
    assert refused == []
    for room in rooms:
        mine = [m for m in replies if m["room"] == room]
        assert [m["offset"] for m in mine] == list(range(2, len(mine) + 2))
    got = await messages(member, count)
    for room in rooms:
        assert [(m["data"]["n"], m["offset"]) for m in got if m["room"] == room] == [
            (m["id"], m["offset"]) for m in replies if m["room"] == room]
    for room in rooms:
        await barrier(pub, room, member)


# --- 5. recovery while a burst flows ----------------------------------------------------------


async def test_join_with_since_during_a_burst_gets_replay_then_live_without_gap_or_duplicate(
    start_node: StartNode, redis_server: RedisServer,
) -> None:
    """Members joining with since (one per node) while another connection keeps publishing get
    every message after their position exactly once, in order: the replay, then live."""
    a, b = two_nodes(start_node, redis_server, "--history-size", "20000")
    room, window = "r", 50
    watchers = [await native(a, "watch-a"), await native(b, "watch-b")]  # Rooms stay subscribed.
    for watcher in watchers:
        await join(watcher, room)
    pub = await native(a, "pub")
    for i in range(20):
        last = await pub.request(publish(room, i, f"pre{i}"))
    since = {"offset": last["offset"], "epoch": last["epoch"]}
    assert since["offset"] == 20
    joiners = [await native(a, "join-a"), await native(b, "join-b")]
    started, joined = asyncio.Event(), asyncio.Event()

    async def bursts() -> int:
        """Windows of 50 pipelined publishes, acks read, until 5 windows after the joins;
        at most 200 windows and 20 s."""
        sent, after = 20, 0
        deadline = time.monotonic() + 20
        for n in range(200):
            for _ in range(window):
                await pub.send(publish(room, sent, sent))
                sent += 1
            acks = await answers(pub, window)
            assert [m["type"] for m in acks] == ["published"] * window, acks
            if n == 1:
                started.set()
            after += joined.is_set()
            if after >= 5 or time.monotonic() > deadline:
                break
        return sent

    sender = asyncio.create_task(bursts())
    async with asyncio.timeout(10):
        await started.wait()
    replies = await asyncio.gather(*(join(j, room, since=since) for j in joiners))
    joined.set()
    total = await sender
    assert total >= 20 + 7 * window  # Two windows before the joins, at least four after.
    for watcher in watchers:
        got = await messages(watcher, total)
        assert [(m["offset"], m["data"]) for m in got] == [(i + 1, i) for i in range(total)]
    for joiner, reply in zip(joiners, replies, strict=True):
        assert reply["recovered"] is True, reply
        assert 20 + 2 * window <= reply["offset"] < total, reply  # Replay, then live.
        got = await messages(joiner, total - 20)
        assert [(m["offset"], m["data"]) for m in got] == [
            (i + 1, i) for i in range(20, total)], joiner
    await barrier(pub, room, *joiners, *watchers)


# --- 6. typing inside a burst -----------------------------------------------------------------


async def test_typing_inside_a_burst_reaches_the_others_not_the_typist_and_keeps_the_order(
    start_node: StartNode, redis_server: RedisServer,
) -> None:
    """A member's typing, sent in the middle of a 300-message burst to its room, reaches the
    other members on both nodes once and not the typist; every member gets the messages in
    order."""
    a, b = two_nodes(start_node, redis_server)
    typist, near, far = (await native(a, "typist"), await native(a, "near"),
                         await native(b, "far"))
    for client in (typist, near, far):
        await join(client, "r")
    pub = await native(a, "pub")
    count = 300
    for i in range(count):
        if i == count // 2:
            await typist.send({"type": "typing", "room": "r"})
        await pub.send(publish("r", i, i))
    acks = await answers(pub, count)
    assert [m["type"] for m in acks] == ["published"] * count
    # The typist's marker is published after its typing event was: it comes after that too.
    marker = uuid.uuid4().hex
    assert (await typist.request(publish("r", marker, "m")))["type"] == "published"
    expected = [*range(count), marker]
    for client in (typist, near, far):
        seen = await until_marker(client, marker)
        got = [m for m in seen if m["type"] == "message"]
        assert [m["data"] for m in got] == expected
        assert consecutive([m["offset"] for m in got])
        typing = [m for m in seen if m["type"] == "typing"]
        if client is typist:
            assert typing == [], typing
        else:
            assert typing == [{"type": "typing", "room": "r",
                               "from": {"user_id": "typist", "username": "typist"}}]
    await barrier(pub, "r", typist, near, far)


# --- 7. a slow reader in a burst --------------------------------------------------------------


async def test_a_reader_that_stops_reading_is_closed_4000_and_the_others_get_everything(
    start_node: StartNode, redis_server: RedisServer,
) -> None:
    """A member that stops reading during bursts of 16 KB messages is closed with 4000 (slow
    consumer) once more than --max-send-buffer waits for it; what it got is an in-order prefix,
    and the members on both nodes get every message, in order."""
    # A long --close-timeout: the 4000 close frame waits behind the backlog until it reads.
    a, b = two_nodes(start_node, redis_server, "--max-send-buffer", "65536",
                     "--close-timeout", "30")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect: a small receive window, so that the kernel holds little of the backlog.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", a.port)),
                           10)
    slow = await Client.open(a.ws("/ws?user_id=slow"), sock=sock)
    await slow.expect("welcome")
    fast = [await native(a, "fast-a"), await native(b, "fast-b")]
    for client in (slow, *fast):
        await join(client, "r")
    pub = await native(a, "pub")
    slow.ws.transport.pause_reading()  # Reads nothing more: the kernel buffers fill, then ours.
    blob, window, sent, extra = "x" * 16384, 50, 0, 0
    deadline = time.monotonic() + 20
    # Bounded: at most 100 windows (5000 messages, 80 MB), 20 s, and two windows after the cut.
    for _ in range(100):
        for _ in range(window):
            await pub.send(publish("r", {"n": sent, "blob": blob}, sent))
            sent += 1
        acks = await answers(pub, window)
        assert [m["type"] for m in acks] == ["published"] * window
        for client in fast:
            got = await messages(client, window)
            assert [m["data"]["n"] for m in got] == list(range(sent - window, sent))
        extra += bool(a.logged("closing slow consumer"))
        if extra >= 2 or time.monotonic() > deadline:
            break
    assert extra >= 2, f"no slow-consumer cut after {sent} messages"
    assert len(a.logged("closing slow consumer")) == 1
    for client in fast:
        assert consecutive([m["offset"] for m in client.seen if m["type"] == "message"])
    slow.ws.transport.resume_reading()
    prefix = [m for m in await slow.until_closed(timeout=15) if m["type"] == "message"]
    assert slow.ws.close_code == 4000 and slow.ws.close_reason == "slow consumer"
    assert [m["data"]["n"] for m in prefix] == list(range(len(prefix)))
    assert len(prefix) < sent
    await barrier(pub, "r", *fast)
