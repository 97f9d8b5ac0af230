"""Who may connect, and how much: origin checks, node, address and user connection limits, the
handshake rate, and the typing throttle, on real nodes over loopback."""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from roomcast import app
from tests.harness import Client, NodeProcess, RedisServer, barrier, native

SECRET = "limits-test-secret-0123456789-abcdefghij"

StartNode = Callable[..., NodeProcess]


def token(sub: str, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600, **claims}, SECRET,
                      algorithm="HS256")


def jwt_flags(*extra: str) -> tuple[str, ...]:
    return ("--auth", "jwt", "--jwt-secret", SECRET, *extra)


async def refused(url: str, **kwargs: Any) -> Any:
    """The HTTP response of a handshake that must be refused."""
    with pytest.raises(InvalidStatus) as caught:
        client = await Client.open(url, **kwargs)
        await client.close()
    return caught.value.response


async def works(client: Client, rid: str = "alive") -> None:
    """The connection is open and served: a ping gets its pong."""
    assert await client.request({"type": "ping", "id": rid}) == {"type": "pong", "id": rid}


async def admitted_eventually(open_client: Callable[[], Any], timeout: float = 10.0) -> Client:
    """Retry ``open_client`` until it returns a client (a refusal raises, or returns None),
    for at most ``timeout`` seconds: a closed connection is released asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = await open_client()
        except InvalidStatus:
            client = None
        if client is not None:
            return client
        if time.monotonic() > deadline:
            raise TimeoutError(f"still refused after {timeout}s")
        await asyncio.sleep(0.05)


# --- origins ------------------------------------------------------------------------------


async def test_allowed_origins_glob(start_node: StartNode) -> None:
    """--allowed-origins 'https://*.example.com': a matching Origin is upgraded, another gets
    HTTP 403, and a request without Origin (not a browser) passes."""
    node = start_node(None, "--allowed-origins", "https://*.example.com")
    url = node.ws("/ws?user_id=u")
    for origin in ("https://app.example.com", "HTTPS://App.Example.COM"):
        client = await Client.open(url, origin=origin)
        await client.expect("welcome")
        await client.close()
    for origin in ("https://evil.com", "https://example.com", "http://app.example.com",
                   "https://app.example.com.evil.com"):
        response = await refused(url, origin=origin)
        assert response.status_code == 403, origin
        assert b"origin" in response.body
    client = await Client.open(url)
    await client.expect("welcome")


async def test_jwt_without_origin_list_allows_only_the_same_host(start_node: StartNode) -> None:
    """--auth jwt and no --allowed-origins: an Origin of another host gets 403; the host the
    request was sent to passes on any port; no Origin passes."""
    node = start_node(None, *jwt_flags())
    url = node.ws(f"/ws?token={token('alice')}")
    for origin in (f"http://localhost:{node.port}", "https://evil.com",
                   f"http://127.0.0.2:{node.port}"):
        response = await refused(url, origin=origin)
        assert response.status_code == 403, origin
    for origin in (f"http://127.0.0.1:{node.port}", "https://127.0.0.1:8443",
                   "http://127.0.0.1", None):
        client = await Client.open(url, origin=origin)
        assert (await client.expect("welcome"))["user_id"] == "alice"
        await client.close()


# --- connection limits --------------------------------------------------------------------


async def test_max_connections_refuses_with_503_until_one_closes(start_node: StartNode) -> None:
    """--max-connections 2: the third handshake gets HTTP 503; once one closes, a new one is
    accepted, and the open ones are served throughout."""
    node = start_node(None, "--max-connections", "2")
    first, second = await native(node, "a"), await native(node, "b")
    response = await refused(node.ws("/ws?user_id=c"))
    assert response.status_code == 503
    assert b"node is full" in response.body
    await works(first)
    await works(second)
    await first.close()

    async def third() -> Client:
        return await native(node, "c")

    client = await admitted_eventually(third)
    await works(client)
    await works(second)
    assert (await refused(node.ws("/ws?user_id=d"))).status_code == 503


async def test_max_connections_per_address_refuses_with_429(start_node: StartNode) -> None:
    """--max-connections-per-address 2: a third connection from 127.0.0.1 gets HTTP 429 with
    Retry-After; the open ones and another address are still served."""
    node = start_node(None, "--max-connections-per-address", "2")
    first, second = await native(node, "a"), await native(node, "b")
    response = await refused(node.ws("/ws?user_id=c"))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    await works(first)
    await works(second)
    other = await Client.open(node.ws("/ws?user_id=d"), local_addr=("127.0.0.2", 0))
    await other.expect("welcome")
    await works(other)
    await first.close()

    async def again() -> Client:
        return await native(node, "e")

    await works(await admitted_eventually(again))


async def open_user(node: NodeProcess, sub: str) -> Client:
    return await Client.open(node.ws(f"/ws?token={token(sub)}"))


async def assert_over_user_limit(node: NodeProcess, sub: str) -> None:
    client = await open_user(node, sub)
    messages = await client.until_closed()
    assert [(m["type"], m["code"]) for m in messages] == [("error", "forbidden")], messages
    assert "2 connections" in messages[0]["message"]
    assert client.ws.close_code == 4503
    assert client.ws.close_reason == "too many connections"


async def test_max_connections_per_user_across_two_nodes(
    start_node: StartNode, redis_server: RedisServer,
) -> None:
    """--max-connections-per-user 2 on two nodes sharing Redis: alice's third connection, on
    either node, gets forbidden and close 4503; bob connects; once alice closes one, she gets
    one back, and only one."""
    flags = jwt_flags("--max-connections-per-user", "2")
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    alice_a = await open_user(a, "alice")
    assert (await alice_a.expect("welcome"))["user_id"] == "alice"
    alice_b = await open_user(b, "alice")
    await alice_b.expect("welcome")
    await assert_over_user_limit(a, "alice")
    await assert_over_user_limit(b, "alice")
    for node in (a, b):
        bob = await open_user(node, "bob")
        assert (await bob.expect("welcome"))["user_id"] == "bob"
    await works(alice_a)
    await works(alice_b)
    await alice_a.close()

    async def alice_again() -> Client | None:
        client = await open_user(b, "alice")
        first = await client.recv()
        if first["type"] == "welcome":
            return client
        assert await client.closed() == 4503
        return None

    back = await admitted_eventually(alice_again)
    await works(back)
    await assert_over_user_limit(a, "alice")
    # With the token in a connect frame, the error answers that frame's id.
    late = await Client.open(a.ws("/ws"))
    await late.send({"type": "connect", "token": token("alice"), "id": "c1"})
    messages = await late.until_closed()
    assert [(m["type"], m["code"], m.get("id")) for m in messages] == [
        ("error", "forbidden", "c1")], messages
    assert late.ws.close_code == 4503


async def test_connections_of_a_dead_node_stop_counting_towards_the_user_limit(
    start_node: StartNode, redis_server: RedisServer,
) -> None:
    """--max-connections-per-user 2: once the node holding alice's two connections dies
    (SIGKILL), its lease lapses and alice connects to the other node."""
    flags = jwt_flags("--max-connections-per-user", "2", "--node-lease-ttl", "2")
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    for _ in range(2):
        await (await open_user(a, "alice")).expect("welcome")
    await assert_over_user_limit(b, "alice")
    a.kill()

    async def alice_on_b() -> Client | None:
        client = await open_user(b, "alice")
        if (await client.recv())["type"] == "welcome":
            return client
        assert await client.closed() == 4503
        return None

    await works(await admitted_eventually(alice_on_b, timeout=15))


async def test_handshake_rate_refuses_the_burst_overflow_with_429(start_node: StartNode) -> None:
    """--handshake-rate 1 --handshake-burst 3: the fourth rapid handshake from one address gets
    HTTP 429 with a Retry-After in seconds; another address is not charged for it."""
    node = start_node(None, "--handshake-rate", "1", "--handshake-burst", "3")
    clients = [await native(node, f"u{n}") for n in range(3)]
    response = await refused(node.ws("/ws?user_id=u3"))
    assert response.status_code == 429
    assert b"too many handshakes" in response.body
    assert int(response.headers["Retry-After"]) >= 1
    other = await Client.open(node.ws("/ws?user_id=o"), local_addr=("127.0.0.2", 0))
    await other.expect("welcome")
    for client in clients:
        await works(client)


# --- typing -------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["fastapi", "native"])
async def test_typing_burst_is_throttled_not_refused(start_node: StartNode, dialect: str) -> None:
    """80 typing frames at once (the browser demo sends one per keystroke) with the default
    rate limits: no close, no rate_limited error, at most one typing event per
    --typing-interval reaches the others, and the typist's next chat message is published."""
    interval = 1.0
    node = start_node(None, "--typing-interval", str(interval))
    reader = await native(node, "reader")
    assert (await reader.request({"type": "join", "room": "r", "id": "j"}))["type"] == "joined"
    if dialect == "native":
        typist = await native(node, "typist")
        assert (await typist.request({"type": "join", "room": "r", "id": "j"}))["type"] == (
            "joined")
        frame = '{"type":"typing","room":"r"}'
    else:
        typist = await Client.open(node.ws("/ws/chat/r?user_id=typist&username=typist"))
        assert (await typist.expect("room_members"))["count"] == 2
        frame = '{"type":"typing"}'
    started = time.monotonic()
    for _ in range(80):
        await typist.send(frame)
    if dialect == "native":
        await barrier(typist, "r", reader)  # Published and acknowledged (published).
    else:
        await typist.send({"type": "message", "content": "done typing"})
        # Its own message back is the dialect's acknowledgement.
        assert (await typist.expect("message"))["content"] == "done typing"
        assert (await reader.expect("message"))["data"] == "done typing"
    elapsed = time.monotonic() - started
    typing = [m for m in reader.seen if m["type"] == "typing"]
    assert 1 <= len(typing) <= math.ceil(elapsed / interval) + 1, (len(typing), elapsed)
    assert typing[0]["from"] == {"user_id": "typist", "username": "typist"}
    assert [m for m in typist.seen if m["type"] == "error"] == []
    if dialect == "native":
        await works(typist)
    else:
        await typist.send({"type": "ping"})
        assert await typist.expect("pong") == {"type": "pong"}
    assert typist.ws.close_code is None


async def test_a_connect_storm_at_a_stalled_node_is_queued_by_its_backlog(
        start_node: StartNode) -> None:
    """200 TCP connects reach a node that is not accepting (SIGSTOP, as under a busy loop): with
    --backlog 256 the kernel completes and queues every one of them, where asyncio's default
    backlog of 100 would drop the SYNs past it (the clients retry after 1 s, 3 s, ...). Once
    the node goes on it serves them."""
    if (somaxconn := app.somaxconn()) is not None and somaxconn < 256:
        pytest.fail(f"net.core.somaxconn is {somaxconn} here: the kernel caps any backlog at it")
    node = start_node(None, "--backlog", "256")
    node.signal(signal.SIGSTOP)
    opened: list[asyncio.StreamWriter] = []
    try:
        async def connect() -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", node.port)
            opened.append(writer)

        await asyncio.wait_for(asyncio.gather(*(connect() for _ in range(200))), 10)
    finally:
        node.signal(signal.SIGCONT)
    assert len(opened) == 200
    for writer in opened:
        writer.close()
    client = await native(node, "after-storm")
    await works(client)
    await client.close()


def test_a_backlog_above_the_kernel_cap_is_logged(start_node: StartNode) -> None:
    """The kernel caps every listen backlog at net.core.somaxconn: a node asked for more says
    so at start, with the sysctl that lifts it."""
    somaxconn = app.somaxconn()
    if somaxconn is None:
        pytest.fail("no /proc/sys/net/core/somaxconn: the node runs on Linux")
    node = start_node(None, "--backlog", str(somaxconn + 1))
    [warning] = node.logged("listen backlog capped by net.core.somaxconn")
    assert (warning["backlog"], warning["somaxconn"]) == (somaxconn + 1, somaxconn)
    assert "sysctl" in warning["fix"]
