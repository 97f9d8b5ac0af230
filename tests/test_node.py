"""A lone node (embedded mode) over real sockets: native protocol, HTTP routes, bad input."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.faults import CRASH_DATA
from tests.harness import Client, NodeProcess, barrier, native, wait_for


def http_get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read(), reply.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def http_json(url: str) -> Any:
    status, body, _ = http_get(url)
    assert status == 200, body
    return json.loads(body)


async def test_publish_reaches_every_member_once_in_order(node: NodeProcess) -> None:
    """Every member, the sender included, gets each message once, in the order published."""
    alice, bob = await native(node, "alice"), await native(node, "bob")
    for client in (alice, bob):
        joined = await client.request({"type": "join", "room": "general", "id": "j"})
        assert joined["type"] == "joined" and joined["room"] == "general"
    for i in range(50):
        await alice.send({"type": "publish", "room": "general", "data": {"n": i}})
    for client in (alice, bob):
        got = [(await client.expect("message"))["data"]["n"] for _ in range(50)]
        assert got == list(range(50))
    message = bob.seen[-1]
    assert message["from"] == {"user_id": "alice", "username": "alice"}
    assert message["offset"] == 50 and isinstance(message["epoch"], str)
    # No 51st copy: the next message either of them gets is a marker alice published after.
    ack = await barrier(alice, "general", alice, bob)
    assert ack["offset"] == 51


async def test_publish_with_id_is_acknowledged_with_offset(node: NodeProcess) -> None:
    """A publish carrying an id gets 'published' with the offset it was given."""
    alice = await native(node, "alice")
    first = await alice.request({"type": "publish", "room": "r1", "data": 1, "id": 7})
    assert first["type"] == "published" and first["id"] == 7 and first["room"] == "r1"
    assert first["offset"] == 1
    assert isinstance(first["epoch"], str) and first["epoch"]
    second = await alice.request({"type": "publish", "room": "r1", "data": 2, "id": 8})
    assert second["type"] == "published" and second["id"] == 8 and second["room"] == "r1"
    assert second["offset"] == 2 and second["epoch"] == first["epoch"]


async def test_leave_stops_delivery(node: NodeProcess) -> None:
    """After 'left', a client receives nothing more from the room."""
    alice, bob = await native(node, "alice"), await native(node, "bob")
    await bob.request({"type": "join", "room": "r", "id": 1})
    left = await bob.request({"type": "leave", "room": "r", "id": 2})
    assert left == {"type": "left", "room": "r", "id": 2}
    ack = await alice.request({"type": "publish", "room": "r", "data": "x", "id": 3})
    assert ack["offset"] == 1
    again = await bob.request({"type": "leave", "room": "r", "id": 4})
    assert again["type"] == "error" and again["code"] == "not_joined"
    # Barrier: bob joins again after "x" (the room's position says so) and alice publishes a
    # marker; a copy of "x" sent to bob would have reached him before it.
    rejoined = await bob.request({"type": "join", "room": "r", "id": 5})
    assert rejoined["type"] == "joined" and rejoined["offset"] == 1
    await barrier(alice, "r", bob)


async def test_typing_goes_to_the_others_only(node: NodeProcess) -> None:
    """A typing notice reaches the other members, not the typist."""
    alice, bob = await native(node, "alice"), await native(node, "bob")
    for client in (alice, bob):
        await client.request({"type": "join", "room": "r", "id": 1})
    await alice.send({"type": "typing", "room": "r"})
    typing = await bob.expect("typing")
    assert typing["from"]["user_id"] == "alice" and typing["room"] == "r"
    pong = await alice.request({"type": "ping", "id": "p"})
    assert pong == {"type": "pong", "id": "p"}
    # Barrier: alice's own marker in the room comes after her typing notice, had she got it.
    await barrier(alice, "r", alice, bob)
    assert not [m for m in alice.seen if m["type"] == "typing"]
    assert [m["type"] for m in bob.seen if m["type"] == "typing"] == ["typing"]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("this is not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('{"type": "dance", "id": 5}', "unknown_type"),
        ('{"type": "join", "id": 5}', "bad_request"),
        ('{"type": "join", "room": "bad room!", "id": 5}', "bad_request"),
        ('{"type": "join", "room": "' + "x" * 65 + '", "id": 5}', "bad_request"),
        ('{"type": "publish", "room": "r", "id": 5}', "bad_request"),
        ('{"type": "history", "room": "r", "limit": 0, "id": 5}', "bad_request"),
        ('{"type": "join", "room": "r", "since": {"offset": -1}, "id": 5}', "bad_request"),
    ],
)
async def test_bad_input_gets_an_error_and_the_connection_stays(
    node: NodeProcess, frame: str, code: str
) -> None:
    """Invalid JSON, unknown types and bad fields get an error envelope; the socket stays open."""
    client = await native(node, "c")
    await client.send(frame)
    error = await client.expect("error")
    assert error["code"] == code and error["message"]
    if '"id": 5' in frame:
        assert error["id"] == 5
    assert (await client.request({"type": "ping", "id": "still"}))["type"] == "pong"


async def test_binary_frames_are_refused_with_an_error(node: NodeProcess) -> None:
    """A binary frame gets error bad_request and is not relayed; the connection stays open."""
    alice, bob = await native(node, "alice"), await native(node, "bob")
    await bob.request({"type": "join", "room": "r", "id": 1})
    await alice.send(b'{"type": "publish", "room": "r", "data": 1}')
    error = await alice.expect("error")
    assert error["code"] == "bad_request" and "binary" in error["message"]
    # Barrier: alice's next (text) publish is the room's first message and bob's next one.
    ack = await barrier(alice, "r", bob)
    assert ack["offset"] == 1


async def test_oversized_frame_closes_with_1009(start_node: Callable[..., NodeProcess]) -> None:
    """A frame over --max-message-size closes that connection with 1009; others carry on."""
    node = start_node(None, "--max-message-size", "1024")
    big, other = await native(node, "big"), await native(node, "other")
    await big.send({"type": "publish", "room": "r", "data": "x" * 2000})
    assert await big.closed() == 1009
    assert (await other.request({"type": "ping", "id": 1}))["type"] == "pong"
    await wait_for(lambda: b'roomcast_closes_total{code="1009"} 1.0' in http_get(
        f"{node.api}/metrics")[1], timeout=10, what="the 1009 close counted as sent")


async def test_rate_limit_then_flood_close(start_node: Callable[..., NodeProcess]) -> None:
    """Past the burst a client gets rate_limited with retry_after_ms; a flooder is closed 1008."""
    node = start_node(None, "--rate-limit", "1", "--rate-burst", "5", "--flood-close-after", "10")
    flooder, bystander = await native(node, "f"), await native(node, "b")
    for i in range(40):
        try:
            await flooder.send({"type": "ping", "id": i})
        except Exception:
            break
    # Everything the node sent before its close frame (nothing can follow it). The connection
    # only ends after the node's --close-timeout (5 s): the frames it never reads fill its
    # receive queue, so it does not read the client's closing reply either.
    replies = await flooder.until_closed(timeout=15)
    assert [m["id"] for m in replies] == list(range(14)), "each frame answered, in order"
    assert [m["type"] for m in replies[:5]] == ["pong"] * 5, "the burst is served"
    errors = replies[5:]
    assert len(errors) == 9, "refusals until the flood limit"
    for error in errors:
        assert error["type"] == "error" and error["code"] == "rate_limited"
        assert error["retry_after_ms"] > 0
    assert await flooder.closed() == 1008
    assert flooder.ws.close_reason == "rate limit exceeded"
    assert (await bystander.request({"type": "ping", "id": "ok"}))["type"] == "pong"


async def test_room_limit_per_connection(start_node: Callable[..., NodeProcess]) -> None:
    """Joining more rooms than --max-rooms-per-connection gets too_many_rooms."""
    node = start_node(None, "--max-rooms-per-connection", "3", "--rate-burst", "100")
    client = await native(node, "c")
    for i in range(3):
        assert (await client.request({"type": "join", "room": f"r{i}", "id": i}))["type"] == (
            "joined")
    error = await client.request({"type": "join", "room": "r9", "id": 9})
    assert error["type"] == "error" and error["code"] == "too_many_rooms"


async def test_handler_crash_closes_only_that_connection(
    start_node: Callable[..., NodeProcess],
) -> None:
    """A crash in a handler closes that connection with 1011, logs the traceback, hides it."""
    # The fault is injected by the harness (tests/faults.py wraps Service.publish), not the node.
    node = start_node(None, faults=["crash_on_data"])
    victim, other = await native(node, "victim"), await native(node, "other")
    await other.request({"type": "join", "room": "r", "id": 1})
    await victim.send({"type": "publish", "room": "r", "data": CRASH_DATA})
    assert await victim.closed() == 1011
    assert victim.ws.close_reason == "internal error"
    for text in ("RuntimeError", "injected fault", "crash_on_data", "Traceback"):
        assert all(text not in json.dumps(m) for m in victim.seen), (text, victim.seen)
        assert text not in victim.ws.close_reason
    ack = await other.request({"type": "publish", "room": "r", "data": "fine", "id": 2})
    assert ack["type"] == "published" and ack["offset"] == 1
    assert (await other.expect("message"))["data"] == "fine"
    await wait_for(lambda: node.logged("handler crashed"), what="crash log")
    [crash] = node.logged("handler crashed")
    assert "Traceback" in crash["exception"]
    assert "RuntimeError: injected fault crash_on_data" in crash["exception"]


async def test_dead_peer_is_dropped_by_keepalive(start_node: Callable[..., NodeProcess]) -> None:
    """A client that stops answering pings is dropped within ping interval + ping timeout +
    close timeout (the closing handshake it is still offered)."""
    interval, timeout, close_timeout = 0.2, 0.3, 0.5
    node = start_node(None, "--ping-interval", str(interval), "--ping-timeout", str(timeout),
                      "--close-timeout", str(close_timeout))
    silent = await Client.open(node.ws("/ws?user_id=silent"), ping_interval=None)
    await silent.expect("welcome")
    assert http_json(f"{node.http}/api/stats")["connections"] == 1
    # Stop reading: the client's transport is paused, so pongs are never sent.
    silent.ws.transport.pause_reading()
    paused = time.monotonic()
    await wait_for(lambda: http_json(f"{node.http}/api/stats")["connections"] == 0,
                   timeout=10, what="dead peer dropped")
    dropped_after = time.monotonic() - paused
    assert dropped_after < interval + timeout + close_timeout + 1.0, dropped_after


def test_http_routes(node: NodeProcess) -> None:
    """The client port answers page, health, readiness, stats, members and 404; metrics are on
    the internal port only."""
    status, body, ctype = http_get(f"{node.http}/")
    assert status == 200 and ctype.startswith("text/html") and b"class Roomcast" in body
    assert http_json(f"{node.http}/healthz")["status"] == "ok"
    assert http_json(f"{node.http}/readyz")["status"] == "ready"
    status, body, _ = http_get(f"{node.api}/metrics")
    assert status == 200 and b"roomcast_connections" in body
    assert b"roomcast_fanout_latency_seconds_bucket" in body
    stats = http_json(f"{node.http}/api/stats")
    assert stats["node_id"] == node.node_id and stats["connections"] == 0
    members = http_json(f"{node.http}/api/rooms/general/members")
    assert members == {"room": "general", "members": [], "count": 0}
    assert http_get(f"{node.http}/nope")[0] == 404
    assert http_get(f"{node.http}/metrics")[0] == 404
    assert http_get(f"{node.http}/api/rooms/bad%20room/members")[0] == 404


async def test_stats_and_members_show_connections(node: NodeProcess) -> None:
    """/api/stats counts local connections per room; members lists who is in a room."""
    alice = await native(node, "alice", "Alice")
    await alice.request({"type": "join", "room": "general", "id": 1})
    stats = http_json(f"{node.http}/api/stats")
    assert stats["connections"] == 1 and stats["rooms"] == {"general": 1}
    members = http_json(f"{node.http}/api/rooms/general/members")
    assert members["count"] == 1
    # Who, not where: no connection or node ids on the public port.
    assert members["members"] == [{"user_id": "alice", "username": "Alice"}]


async def test_public_rest_shows_only_rooms_anyone_may_join(
        start_node: Callable[..., NodeProcess], tmp_path: Any) -> None:
    """With --auth jwt, /api/stats and /api/rooms/{room}/members show a room only when anyone
    may join it: a private room's name, size and members do not leak."""
    import jwt

    secret = "s" * 40
    spaces = tmp_path / "namespaces.toml"
    spaces.write_text('[namespaces.open]\njoin = "anyone"\n[namespaces.vip]\njoin = "granted"\n')
    node = start_node(None, "--auth", "jwt", "--jwt-secret", secret,
                      "--namespaces-file", str(spaces))
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600,
                        "rooms": {"vip:*": ["join"]}}, secret, algorithm="HS256")
    alice = await Client.open(node.ws(f"/ws?token={token}"))
    await alice.expect("welcome")
    for rid, room in enumerate(("open:hall", "vip:gold", "lobby")):
        assert (await alice.request({"type": "join", "room": room, "id": rid}))["type"] == "joined"
    stats = http_json(f"{node.http}/api/stats")
    assert stats["rooms"] == {"open:hall": 1} and stats["cluster"]["rooms"] == {"open:hall": 1}
    assert http_json(f"{node.http}/api/rooms/open:hall/members")["count"] == 1
    for room in ("vip:gold", "lobby"):
        status, body, _ = http_get(f"{node.http}/api/rooms/{room}/members")
        assert status == 403 and b"alice" not in body
    await alice.close()


async def test_upgrade_on_unknown_path_is_refused(node: NodeProcess) -> None:
    """A WebSocket handshake on an unknown path is refused with HTTP 404."""
    with pytest.raises(InvalidStatus) as refused:
        await Client.open(node.ws("/nowhere"))
    assert refused.value.response.status_code == 404


async def test_sigterm_closes_clients_and_exits_zero(
    start_node: Callable[..., NodeProcess],
) -> None:
    """SIGTERM drains: every client gets a 'reconnect' hint then close 1012 'service restart',
    and the process exits 0."""
    # A short drain (the defaults wait 5 s, then spread the closes over 10 s).
    node = start_node(None, "--drain-delay", "0.2", "--drain-window", "0.2")
    clients = [await native(node, f"u{i}") for i in range(3)]
    stopping = asyncio.ensure_future(asyncio.to_thread(node.stop))  # SIGTERM, wait for exit.
    hints = await asyncio.gather(*(c.expect("reconnect") for c in clients))
    assert all(hint["rooms"] == {} for hint in hints), hints
    codes = await asyncio.gather(*(c.closed() for c in clients))
    assert codes == [1012, 1012, 1012]
    assert [c.ws.close_reason for c in clients] == ["service restart"] * 3
    assert await stopping == 0


SLOW_CONSUMER_FLAGS = ("--max-send-buffer", "65536", "--rate-limit", "100000", "--rate-burst",
                       "100000", "--max-message-size", "1048576")


async def cut_slow_member(node: NodeProcess) -> tuple[Client, Client, int, int]:
    """Members ``slow`` and ``fast`` of room r, and a publisher: ``slow`` stops reading and
    16 KB messages are published, ``fast`` keeping up, until the node cuts ``slow`` (bounded:
    at most 4000 messages, 64 MiB). Returns slow, fast, messages sent and read by fast."""
    slow, fast, pub = await native(node, "slow"), await native(node, "fast"), await native(
        node, "pub")
    for client in (slow, fast):
        await client.request({"type": "join", "room": "r", "id": 1})
    slow.ws.transport.pause_reading()  # Stops reading: the kernel buffers fill, then ours.
    blob = "x" * 16384
    sent = received = 0
    while sent < 4000 and not node.logged("closing slow consumer"):
        for _ in range(50):
            await pub.send({"type": "publish", "room": "r", "data": blob})
            sent += 1
        while received < sent - 100:
            await fast.expect("message", timeout=10)
            received += 1
    assert node.logged("closing slow consumer"), f"no cut after {sent} messages"
    return slow, fast, sent, received


async def test_slow_consumer_is_closed_and_others_get_everything(
    start_node: Callable[..., NodeProcess],
) -> None:
    """A member that stops reading is closed with 4000 once its send buffer passes
    --max-send-buffer; the other members keep receiving every message."""
    node = start_node(None, *SLOW_CONSUMER_FLAGS)
    slow, fast, sent, received = await cut_slow_member(node)
    while received < sent:
        await fast.expect("message", timeout=10)
        received += 1
    _, body, _ = http_get(f"{node.api}/metrics")
    assert b'roomcast_errors_total{code="slow_consumer"} 1.0' in body
    slow.ws.transport.resume_reading()
    code = await slow.closed(timeout=15)
    assert code == 4000 and slow.ws.close_reason == "slow consumer"


async def test_slow_consumer_that_never_reads_again_is_dropped(
    start_node: Callable[..., NodeProcess],
) -> None:
    """A member cut off as a slow consumer that never reads again is dropped --close-timeout
    after its 4000, with its buffer: not left open until a keepalive ping (there is none here,
    --ping-interval 0), while the other members keep receiving."""
    node = start_node(None, *SLOW_CONSUMER_FLAGS, "--ping-interval", "0", "--close-timeout", "1")
    _, fast, sent, received = await cut_slow_member(node)  # It stays paused for good.
    cut = node.logged("closing slow consumer")[0]["conn_id"]

    def closed() -> list[dict[str, Any]]:
        return [line for line in node.logged("connection closed") if line.get("conn_id") == cut]

    await wait_for(closed, timeout=15, what="the cut connection dropped")
    assert closed()[0]["code"] == 4000
    while received < sent:  # The others lost nothing meanwhile.
        await fast.expect("message", timeout=10)
        received += 1


def raw_request(node: NodeProcess, head: str) -> bytes:
    """Send ``head`` as an HTTP request on a raw socket; the status line of the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(head.encode("latin-1"))
        return sock.recv(4096).split(b"\r\n", 1)[0]


UPGRADE = ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.mark.parametrize(("extra", "status"), [
    ("Origin: https://a.example\r\nOrigin: https://b.example\r\n", b"400"),
    ("Host: other\r\n", b"400"),
    ("Authorization: Bearer x\r\nAuthorization: Bearer y\r\n", b"401"),
    ("Origin: http://[zz\r\n", b"403"),
])
async def test_repeated_or_malformed_handshake_headers_get_a_clean_refusal(
        start_node: Callable[..., NodeProcess], extra: str, status: bytes) -> None:
    """Two Origin, Host or Authorization headers, or a malformed Origin, get a documented 4xx,
    never a 500, and the node serves the next client."""
    node = start_node(None, "--auth", "jwt", "--jwt-secret", "s" * 32)
    assert raw_request(node, UPGRADE + extra + "\r\n").split(b" ")[1] == status
    assert not node.logged("process_request failed")
    assert http_json(f"{node.http}/readyz")["status"] == "ready"


@pytest.mark.parametrize("clustered", [False, True], ids=["embedded", "redis"])
def test_an_unusable_key_file_stops_the_node_with_one_line(
        request: pytest.FixtureRequest, tmp_path: Any, clustered: bool) -> None:
    """A --api-key-file the node cannot use ends it at once with exit 2 and one line, in
    cluster mode too (where a half-started node once hung on its Redis threads)."""
    import subprocess
    import sys

    keys = tmp_path / "keys"
    keys.write_text("short\n")
    flags = ["--port", "0", "--api-port", "0", "--api-key-file", str(keys)]
    if clustered:
        flags += ["--redis-url", request.getfixturevalue("redis_server").url]
    done = subprocess.run([sys.executable, "-m", "roomcast", "node", *flags],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"roomcast node: --api-key-file: {keys} line 1: a secret must be at least 32 characters")
