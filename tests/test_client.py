"""node.client and the roomcast chat/publish/subscribe tools against real node processes."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.asyncio.server import ServerConnection, serve

from roomcast.cli import build_parser
from roomcast.protocol.envelopes import Since
from roomcast.tools.client import (
    Client,
    ClientClosed,
    ConnectError,
    RateLimited,
    ServerError,
    backoff_delay,
    native_url,
    retry_delay,
)
from tests import harness
from tests.harness import NodeProcess, RedisServer, free_port, wait_for

ROOMCAST = shutil.which("roomcast", path=str(Path(sys.executable).parent)) or "roomcast"


class Ceiling(random.Random):
    """Always the top of the jitter window, so that a reconnect delay is known in advance."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def next_event(client: Client, kind: str = "message", within: float = 5.0) -> Any:
    """The next event of type ``kind`` from the client, skipping others; bounded."""
    async with asyncio.timeout(within):
        async for event in client:
            if event["type"] == kind:
                return event
    raise AssertionError(f"iteration ended before a {kind}")


async def messages(client: Client, count: int, within: float = 10.0) -> list[Any]:
    """The next ``count`` message envelopes."""
    async with asyncio.timeout(within):
        return [await next_event(client) for _ in range(count)]


async def assert_no_more_messages(client: Client, publisher: Client, room: str) -> None:
    """Barrier: ``publisher`` publishes a marker into ``room``; the client's very next event
    must be that message. The node delivers one publisher's messages to a room in order, so an
    extra (repeated) message would have come first."""
    marker = {"barrier": uuid.uuid4().hex}
    offset = await publisher.publish(room, marker)
    event = await next_event(client, kind="message")
    assert (event["data"], event["offset"]) == (marker, offset), f"extra message: {event}"


def opened(node: NodeProcess) -> list[str | None]:
    """The conn_id of every connection the node logged as opened, in order."""
    return [line.get("conn_id") for line in node.logged("connection opened")]


async def assert_never_reconnects(client: Client, node: NodeProcess) -> None:
    """Barrier for "the client did not reconnect": its iteration has ended (the supervisor has
    given up for good, so it never will), and a probe connection opened now is the node's next
    connection after the client's own."""
    assert not client.connected and client.reconnects == 0 and client.failed_connects == 0
    probe = await harness.native(node, "probe")
    probe_id = probe.seen[0]["conn_id"]
    await wait_for(lambda: probe_id in opened(node), timeout=5, what="the probe's log line")
    assert opened(node) == [client.conn_id, probe_id]
    await probe.close()


# --- the client API ------------------------------------------------------------------------


async def test_join_publish_receive_presence_history(node: NodeProcess) -> None:
    """Join, publish (offset returned), receive in order, presence and history all work."""
    async with Client(node.ws(), user_id="alice") as alice, \
            Client(f"ws://127.0.0.1:{node.port}", user_id="bob", username="Bob") as bob:
        assert alice.node_id == bob.node_id == node.node_id
        assert alice.conn_id is not None and alice.conn_id != bob.conn_id
        joined = await alice.join("general")
        assert (joined["type"], joined["offset"]) == ("joined", 0)
        await bob.join("general")
        arrival = await next_event(alice, "user_joined")
        assert (arrival["user_id"], arrival["username"]) == ("bob", "Bob")

        offsets = [await alice.publish("general", {"n": i}) for i in range(3)]
        assert offsets == [1, 2, 3]
        got = await messages(bob, 3)
        assert [m["data"] for m in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert got[0]["from"] == {"user_id": "alice", "username": "alice"}
        assert bob.rooms == {"general": Since(3, got[0]["epoch"])}

        members = await bob.presence("general")
        assert sorted(m["user_id"] for m in members) == ["alice", "bob"]
        history = await bob.history("general", limit=2)
        assert [m["data"] for m in history] == [{"n": 1}, {"n": 2}]
        since = await bob.history("general", since=Since(1, got[0]["epoch"]))
        assert [m["offset"] for m in since] == [2, 3]

        with pytest.raises(ServerError) as refused:
            await alice.publish("not a room!", 1)
        assert refused.value.code == "bad_request"
        await bob.leave("general")
        assert bob.rooms == {}


async def test_socket_cut_recovers_exactly_the_missed_messages(node: NodeProcess) -> None:
    """A client whose socket dies yields exactly the messages published meanwhile, in order."""
    async with Client(node.ws(), user_id="a", backoff_base=0.5, rng=Ceiling()) as client, \
            Client(node.ws(), user_id="pub") as publisher:
        await client.join("r")
        for i in range(5):
            await publisher.publish("r", i)
        assert [m["data"] for m in await messages(client, 5)] == [0, 1, 2, 3, 4]

        client.drop_connection()  # The reconnect then waits exactly 1 s (Ceiling, attempt 1).
        offsets = [await publisher.publish("r", i) for i in range(5, 25)]
        assert offsets == list(range(6, 26))
        assert client.reconnects == 0  # All 20 were published while it was away.

        missed = await messages(client, 20)
        assert [m["data"] for m in missed] == list(range(5, 25))
        assert [m["offset"] for m in missed] == list(range(6, 26))
        await wait_for(lambda: client.connected, timeout=5, what="rejoin done")
        assert client.reconnects == 1
        await assert_no_more_messages(client, publisher, "r")


async def test_reconnect_through_node_restart_recovers_from_redis(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess]
) -> None:
    """Node A drains and comes back on its port; the client there recovers what node B got."""
    flags = ("--presence-grace", "0.3", "--drain-delay", "0", "--drain-window", "0.1")
    a = start_node(redis_server.url, *flags)
    b = start_node(redis_server.url, *flags)
    async with Client(a.ws(), user_id="c", backoff_base=0.05, backoff_cap=0.2,
                      max_failures_before_pause=1000) as client, \
            Client(b.ws(), user_id="pub") as publisher:
        await client.join("r")
        for i in range(3):
            await publisher.publish("r", i)
        assert [m["data"] for m in await messages(client, 3)] == [0, 1, 2]

        old_node, port = a.node_id, a.port
        assert await asyncio.to_thread(a.stop) == 0
        for i in range(3, 13):
            await publisher.publish("r", i)
        assert not client.connected
        restarted = await asyncio.to_thread(start_node, redis_server.url, *flags,
                                            "--port", str(port))
        assert restarted.port == port

        missed = await messages(client, 10, within=15)
        assert [m["data"] for m in missed] == list(range(3, 13))
        await wait_for(lambda: client.connected, timeout=5, what="rejoin done")
        assert client.reconnects == 1 and client.node_id == restarted.node_id != old_node
        assert await publisher.publish("r", "live") == 14
        assert (await next_event(client))["offset"] == 14
        await assert_no_more_messages(client, publisher, "r")


async def test_recovery_failed_when_the_epoch_changed(
    start_node: Callable[..., NodeProcess]
) -> None:
    """An embedded node restarting loses history: the client yields recovery_failed once."""
    node = start_node(None, "--drain-delay", "0", "--drain-window", "0.1")
    async with Client(node.ws(), user_id="c", backoff_base=0.05, backoff_cap=0.2,
                      max_failures_before_pause=1000) as client:
        await client.join("r")
        await client.publish("r", "before")
        old = await next_event(client)
        port = node.port
        await asyncio.to_thread(node.stop)
        await asyncio.to_thread(start_node, None, "--port", str(port))

        failed = await next_event(client, "recovery_failed", within=15)
        assert failed["room"] == "r" and failed["offset"] == 0
        assert failed["epoch"] != old["epoch"]
        assert client.rooms == {"r": Since(0, failed["epoch"])}
        assert await client.publish("r", "after") == 1
        # Once: nothing at all comes between the recovery_failed and the next message.
        async with asyncio.timeout(5):
            after = await anext(client)
        assert after["type"] == "message", after
        assert (after["data"], after["offset"], after["epoch"]) == ("after", 1, failed["epoch"])


async def test_reconnect_hint_sets_the_wait_and_the_resume_position() -> None:
    """A 'reconnect' hint sets the wait (retry_after_ms) and a newer resume offset."""
    joins: list[tuple[float, dict[str, Any]]] = []
    loop = asyncio.get_running_loop()

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "welcome", "conn_id": "c1", "node_id": "fake"}))
        join = json.loads(await ws.recv())
        joins.append((loop.time(), join))
        if len(joins) == 1:
            await ws.send(json.dumps({"type": "joined", "room": "r", "offset": 5,
                                      "epoch": "e1", "id": join["id"]}))
            await ws.send(json.dumps({"type": "reconnect", "retry_after_ms": 300,
                                      "rooms": {"r": {"offset": 7, "epoch": "e1"}}}))
            joins.append((loop.time(), {"type": "closing"}))
            await ws.close(1012, "service restart")
            return
        await ws.send(json.dumps({"type": "joined", "room": "r", "offset": 8, "epoch": "e1",
                                  "recovered": True, "id": join["id"]}))
        for offset in (7, 8):  # 7 is at the hinted position: not delivered again.
            await ws.send(json.dumps({"type": "message", "room": "r", "data": offset,
                                      "offset": offset, "epoch": "e1"}))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        # Its own backoff would wait 10 s: a reconnect well before proves the hint was used.
        async with Client(f"ws://127.0.0.1:{port}", backoff_base=10, rng=Ceiling()) as client:
            await client.join("r")
            message = await next_event(client, within=5)
            assert message["offset"] == 8
            (_, first), (closing_at, _), (rejoined_at, second) = joins
            assert "since" not in first
            assert second["since"] == {"offset": 7, "epoch": "e1"}
            assert 0.3 <= rejoined_at - closing_at < 5


async def test_flooding_close_1008_is_terminal(start_node: Callable[..., NodeProcess]) -> None:
    """Closed with 1008 for flooding, the client does not reconnect; iteration raises it."""
    node = start_node(None, "--rate-limit", "0.5", "--rate-burst", "1",
                      "--flood-close-after", "3")
    async with Client(node.ws(), user_id="flood", backoff_base=0.01) as client:
        results = await asyncio.gather(*(client.publish("r", i) for i in range(6)),
                                       return_exceptions=True)
        assert results[0] == 1
        assert [type(r) for r in results[1:3]] == [RateLimited, RateLimited]
        assert all(r.retry_after_ms > 0 for r in results[1:3])
        assert [(type(r), r.code) for r in results[3:]] == [(ClientClosed, 1008)] * 3
        with pytest.raises(ClientClosed) as closed:
            await next_event(client)
        assert closed.value.code == 1008
        with pytest.raises(ClientClosed):
            await client.publish("r", "again")
        await assert_never_reconnects(client, node)


async def test_oversize_close_1009_is_terminal(start_node: Callable[..., NodeProcess]) -> None:
    """Closed with 1009 for an oversized frame, the client stops for good with that code."""
    node = start_node(None, "--max-message-size", "256")
    async with Client(node.ws(), user_id="big", backoff_base=0.01) as client:
        with pytest.raises(ClientClosed) as refused:
            await client.publish("r", "x" * 1000)
        assert refused.value.code == 1009
        with pytest.raises(ClientClosed) as closed:
            await next_event(client)
        assert closed.value.code == 1009
        await assert_never_reconnects(client, node)


async def test_silent_dead_connection_detected_by_heartbeat(node: NodeProcess) -> None:
    """A node that stops answering (SIGSTOP) is dropped by the ping timeout, then rejoined."""
    async with Client(node.ws(), user_id="hb", ping_interval=0.2, ping_timeout=0.3,
                      close_timeout=0.3, backoff_base=0.05, backoff_cap=0.2,
                      max_failures_before_pause=1000) as client:
        await client.join("r")
        node.signal(signal.SIGSTOP)
        try:
            await wait_for(lambda: not client.connected, timeout=3, what="dead peer noticed")
        finally:
            node.signal(signal.SIGCONT)
        await wait_for(lambda: client.connected, timeout=15, what="reconnect")
        assert client.reconnects == 1 and list(client.rooms) == ["r"]


def test_backoff_is_full_jitter_under_the_cap() -> None:
    """Each delay is uniform(0, min(cap, base * 2**attempt)), drawn from the injected rng."""
    rng, twin = random.Random(7), random.Random(7)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        for _ in range(20):
            delay = backoff_delay(attempt, 0.5, 30.0, rng)
            assert 0.0 <= delay <= ceiling
            assert delay == twin.uniform(0.0, ceiling)
    top = [backoff_delay(200, 0.5, 30.0, Ceiling()), backoff_delay(5, 0.5, 30.0, Ceiling())]
    assert top == [30.0, 16.0]


def test_retry_delay_pauses_after_max_failures() -> None:
    """Every max_failures-th failure in a row waits `pause`; the exponent then starts over."""
    delays = [retry_delay(n, base=0.5, cap=30.0, max_failures=10, pause=60.0, rng=Ceiling())
              for n in range(22)]
    assert delays[:10] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert delays[10] == delays[20] == 60.0
    assert delays[11:13] == [1.0, 2.0]


def test_native_url_accepts_the_base_or_the_ws_path() -> None:
    """ws://host:port and ws://host:port/ws both reach /ws; identity goes in the query."""
    assert native_url("ws://h:1") == native_url("ws://h:1/") == "ws://h:1/ws"
    assert native_url("ws://h:1/ws", "u 1", "Al") == "ws://h:1/ws?user_id=u+1&username=Al"
    assert native_url("https://h") == "wss://h/ws"
    with pytest.raises(ValueError):
        native_url("ftp://h")


# --- the command-line tools --------------------------------------------------------------------


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        ROOMCAST, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_until(stream: asyncio.StreamReader | None, wanted: str,
                     within: float = 10.0) -> list[str]:
    """Lines from ``stream`` up to and including ``wanted``; bounded."""
    assert stream is not None
    lines: list[str] = []
    async with asyncio.timeout(within):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"EOF before {wanted!r}; got {lines}")
            lines.append(raw.decode().rstrip("\n"))
            if wanted in lines[-1]:
                return lines


async def exit_code(proc: asyncio.subprocess.Process, within: float = 10.0) -> int:
    async with asyncio.timeout(within):
        return await proc.wait()


async def test_chat_between_two_terminals(node: NodeProcess) -> None:
    """Two `roomcast chat` processes: alice's line shows on bob's screen; /quit and EOF exit 0."""
    alice = await spawn("chat", f"ws://127.0.0.1:{node.port}", "--room", "general",
                        "--name", "alice")
    bob = None
    try:
        await read_until(alice.stdout, "* joined general as alice")
        bob = await spawn("chat", node.ws(), "--room", "general", "--name", "bob")
        assert (await read_until(bob.stdout, "* joined"))[-1] == \
            "* joined general as bob; here: alice, bob"
        await read_until(alice.stdout, "* bob joined")

        assert alice.stdin is not None and bob.stdin is not None
        alice.stdin.write(b"hello\n")
        await alice.stdin.drain()
        assert (await read_until(bob.stdout, "hello"))[-1] == "alice: hello"
        bob.stdin.write(b"/quit\n")
        await bob.stdin.drain()
        assert await exit_code(bob) == 0
        await read_until(alice.stdout, "* bob left")
        alice.stdin.close()  # End of input leaves like /quit.
        assert await exit_code(alice) == 0
    finally:
        for proc in (alice, bob):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_publish_then_subscribe_count(node: NodeProcess) -> None:
    """`subscribe --count 3` prints exactly the 3 messages `publish --data -` sent, as JSON."""
    subscriber = await spawn("subscribe", node.ws(), "--room", "feed", "--count", "3")
    try:
        await read_until(subscriber.stderr, "joined feed at offset 0")
        publisher = await spawn("publish", node.ws(), "--room", "feed", "--data", "-")
        async with asyncio.timeout(10):
            out, err = await publisher.communicate(b'{"n": 1}\n"two"\n[3]\n')
        assert publisher.returncode == 0, err
        acks = [json.loads(line) for line in out.decode().splitlines()]
        assert [(a["room"], a["offset"]) for a in acks] == [("feed", 1), ("feed", 2), ("feed", 3)]

        assert await exit_code(subscriber) == 0
        assert subscriber.stdout is not None
        lines = (await subscriber.stdout.read()).decode().splitlines()
        printed = [json.loads(line) for line in lines]
        assert [(m["type"], m["data"], m["offset"]) for m in printed] == [
            ("message", {"n": 1}, 1), ("message", "two", 2), ("message", [3], 3)]
    finally:
        if subscriber.returncode is None:
            subscriber.kill()
            await subscriber.wait()


async def test_subscribe_exits_cleanly_on_sigterm(node: NodeProcess) -> None:
    """SIGTERM stops `roomcast subscribe` with exit code 0 and nothing on stdout."""
    subscriber = await spawn("subscribe", node.ws(), "--room", "quiet")
    try:
        await read_until(subscriber.stderr, "joined quiet")
        subscriber.send_signal(signal.SIGTERM)
        assert await exit_code(subscriber) == 0
        assert subscriber.stdout is not None and await subscriber.stdout.read() == b""
    finally:
        if subscriber.returncode is None:
            subscriber.kill()
            await subscriber.wait()


async def test_publish_failure_is_one_line_and_exit_1(node: NodeProcess) -> None:
    """A refused publish, or no node at all, exits 1 with one line on stderr."""
    refused = await spawn("publish", node.ws(), "--room", "bad room", "--text", "hi")
    unreachable = await spawn("publish", f"ws://127.0.0.1:{free_port()}", "--room", "r",
                              "--text", "hi")
    for proc, expected in ((refused, "roomcast publish: bad_request: room must be"),
                           (unreachable, "roomcast publish: cannot connect to ws://127.0.0.1:")):
        async with asyncio.timeout(10):
            out, err = await proc.communicate()
        assert proc.returncode == 1 and out == b""
        assert len(err.decode().splitlines()) == 1 and err.decode().startswith(expected)


def test_every_client_flag_has_help() -> None:
    """Every option and argument of chat, publish and subscribe explains itself in --help."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands is not None
    for name in ("chat", "publish", "subscribe"):
        sub = commands[name]
        for action in sub._actions:
            assert action.help, f"roomcast {name} {action.option_strings or action.dest}"


SECRET = "test-secret-" + "x" * 32


def _token(sub: str, ttl: float) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


def jwt_exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_token_provider_answers_refresh_required_and_the_connection_stays(
        start_node: Callable[..., NodeProcess]) -> None:
    """A client given a token function sends it as a bearer header, answers refresh_required
    with a fresh token, and is not closed when the grace ends."""
    node = start_node(None, "--auth", "jwt", "--jwt-secret", SECRET, "--jwt-leeway", "0",
                      "--refresh-grace", "1")
    issued: list[str] = []

    def token() -> str:
        issued.append(_token("alice", 2 if not issued else 3600))
        return issued[-1]

    async with Client(node.http, token=token) as client:
        await client.join("r")
        # The first token expires within 2 s; the refresh is the client's second call.
        await wait_for(lambda: len(issued) == 2, timeout=6)
        first_exp = jwt_exp(issued[0])
        # Until the moment the node would have closed it (exp + grace), then a round trip.
        await wait_for(lambda: time.time() > first_exp + 1.2, timeout=6)
        await client.publish("r", "still here")
        assert (await next_event(client))["data"] == "still here"
        assert client.reconnects == 0


async def test_a_refused_token_is_terminal_for_the_client(
        start_node: Callable[..., NodeProcess]) -> None:
    """A token the node refuses (HTTP 401) makes connect() fail, without retrying."""
    node = start_node(None, "--auth", "jwt", "--jwt-secret", SECRET)
    client = Client(node.http, token="not-a-token")
    with pytest.raises(ConnectError, match="401"):
        await client.connect()
    assert client.failed_connects == 1
