"""The client port answers every plain HTTP request cleanly (transports/handshake.py
``screen_head``, transports/http.py): exact 4xx statuses with ``Connection: close``, nothing
administrative, and bounded, cached public REST. One embedded node per test, raw sockets for
requests no HTTP client would send."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness import Client, NodeProcess, barrier, native, wait_for

StartNode = Callable[..., NodeProcess]

ADMIN_TOKEN = "admin-token-0123456789abcdef0123456789"
FAST = ("--presence-grace", "0.3", "--rate-burst", "500")
#: The public members answer lists at most this many users (http.PUBLIC_MEMBERS).
PUBLIC_MEMBERS = 100


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw(port: int, request: bytes, timeout: float = 5.0) -> Answer:
    """Send ``request`` as is to 127.0.0.1:``port`` and read the answer up to the server's
    close (which must come within ``timeout``: every answer here ends the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        pass  # The server closed with part of a large request unread: what it sent was read.
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.fullmatch(r"HTTP/1\.1 (\d{3}) .*", lines[0])
    assert match, f"not an HTTP answer: {data[:200]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(match.group(1)), headers, body)


def get(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


async def refused_counts(node: NodeProcess) -> dict[str, float]:
    """roomcast_http_refused_total by status, from the internal /metrics."""
    answer = await raw(node.api_port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Connection: close\r\n\r\n")
    assert answer.status == 200
    found = re.findall(rb'^roomcast_http_refused_total\{status="(\d+)"\} (\S+)$', answer.body,
                       re.MULTILINE)
    return {status.decode(): float(value) for status, value in found}


def errors_logged(node: NodeProcess, since: int) -> list[dict[str, Any]]:
    return [line for line in node.lines[since:]
            if line.get("level") in ("error", "critical", "exception") or "exception" in line]


async def round_trip(client: Client) -> None:
    """The client still publishes and gets its own message back."""
    await barrier(client, "canary", client)


@pytest.fixture
async def canary(start_node: StartNode) -> tuple[NodeProcess, Client]:
    """An embedded node with a native client in room ``canary``."""
    node = start_node(None, "--admin-token", ADMIN_TOKEN, *FAST)
    client = await native(node, "canary")
    reply = await client.request({"type": "join", "room": "canary", "id": "j"})
    assert reply["type"] == "joined", reply
    return node, client


REFUSED = {
    "post with a body": (b"POST /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: 5\r\n\r\nhello", 405),
    "put with a body": (b"PUT /api/rooms/r/members HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 405),
    "delete": (b"DELETE /api/rooms/r/members HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    "get with a body": (b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Length: 5\r\n\r\nhello", 413),
    "chunked post": (b"POST /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 405),
    "malformed request line": (b"HELLO THERE\r\nHost: 127.0.0.1\r\n\r\n", 400),
    "non-ascii path": (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    "header block over 16 KiB": (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000) for i in range(5)) + b"\r\n", 431),
    "header line without a colon": (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nNoColonHere\r\n\r\n",
                                    400),
}


async def check_refused(node: NodeProcess, client: Client, request: bytes,
                        status: int) -> None:
    """``request`` gets ``status`` with Connection: close, counted, no error logged, and the
    client still gets a round trip."""
    before, mark = await refused_counts(node), len(node.lines)
    answer = await raw(node.port, request)
    assert answer.status == status, answer
    assert answer.headers.get("connection") == "close", answer.headers
    if status == 405:
        assert answer.headers.get("allow") == "GET", answer.headers
    after = await refused_counts(node)
    assert after.get(str(status), 0) == before.get(str(status), 0) + 1, (before, after)
    await round_trip(client)
    assert errors_logged(node, mark) == []


@pytest.mark.parametrize("case", list(REFUSED))
async def test_unservable_request_gets_a_clean_answer(canary: tuple[NodeProcess, Client],
                                                      case: str) -> None:
    """A request the client port does not serve gets its documented 4xx with Connection:
    close, counted in roomcast_http_refused_total, no error logged, and open clients carry
    on."""
    node, client = canary
    request, status = REFUSED[case]
    await check_refused(node, client, request, status)


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nnobody-home\r\n\r\n",
    b"GET /body HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n",
], ids=["header line", "request line"])
async def test_malformed_head_quoting_body_is_400(canary: tuple[NodeProcess, Client],
                                                  request_bytes: bytes) -> None:
    """A malformed request head is 400 whatever text it contains."""
    node, client = canary
    await check_refused(node, client, request_bytes, 400)


async def test_other_methods_without_a_body_are_405(canary: tuple[NodeProcess, Client]) -> None:
    """POST and PUT without a body reach the routes, which answer 405 with Connection: close;
    clients carry on and nothing is logged as an error."""
    node, client = canary
    mark = len(node.lines)
    for method in ("POST", "PUT"):
        answer = await raw(node.port, f"{method} /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      "\r\n".encode())
        assert answer.status == 405, answer
        assert answer.headers.get("connection") == "close", answer.headers
    await round_trip(client)
    assert errors_logged(node, mark) == []


ADMIN_PATHS = ["/metrics", "/admin/drain", "//admin/drain", "//api/admin/drain",
               "/api/admin/drain"]


async def test_nothing_administrative_on_the_client_port(
        canary: tuple[NodeProcess, Client]) -> None:
    """/metrics and every spelling of the drain endpoint are 404 on the client port (405 for a
    POST), even with the admin token, and the node is still ready afterwards."""
    node, client = canary
    auth = f"Authorization: Bearer {ADMIN_TOKEN}"
    for path in ADMIN_PATHS:
        answer = await raw(node.port, get(path, auth))
        assert answer.status == 404, (path, answer)
        assert b"roomcast_" not in answer.body, path
        post = await raw(node.port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n"
                                    "\r\n".encode())
        assert post.status == 405, (path, post)
    for port in (node.port, node.api_port):
        ready = await raw(port, get("/readyz", "Connection: close"))
        assert ready.status == 200 and ready.json() == {"status": "ready"}, (port, ready)
    await round_trip(client)


async def members(node: NodeProcess, room: str) -> dict[str, Any]:
    answer = await raw(node.port, get(f"/api/rooms/{room}/members"))
    assert answer.status == 200, answer
    body: dict[str, Any] = answer.json()
    return body


async def stats(node: NodeProcess) -> dict[str, Any]:
    answer = await raw(node.port, get("/api/stats"))
    assert answer.status == 200, answer
    body: dict[str, Any] = answer.json()
    return body


async def join(node: NodeProcess, user: str, room: str) -> Client:
    client = await native(node, user, f"name-{user}")
    reply = await client.request({"type": "join", "room": room, "id": "j"})
    assert reply["type"] == "joined", reply
    return client


async def test_members_lists_users_without_connection_ids(start_node: StartNode) -> None:
    """The public members answer lists each user once, with no connection or node id."""
    node = start_node(None, *FAST)
    for user in ("alice", "alice", "bob"):
        await join(node, user, "pub")
    body = await members(node, "pub")
    assert body["room"] == "pub" and body["count"] == 2 and "truncated" not in body, body
    assert sorted(m["user_id"] for m in body["members"]) == ["alice", "bob"]
    for member in body["members"]:
        assert member == {"user_id": member["user_id"], "username": f"name-{member['user_id']}"}


async def test_members_are_capped_at_100(start_node: StartNode) -> None:
    """A room of 100 users lists them all; of 101, it lists 100 with truncated:true and the
    full count."""
    node = start_node(None, *FAST)
    await asyncio.gather(*(join(node, f"u{i:03}", "big") for i in range(PUBLIC_MEMBERS)))

    async def count_is(n: int) -> bool:
        return bool((await members(node, "big"))["count"] == n)

    await wait_for(lambda: count_is(PUBLIC_MEMBERS), timeout=5, what="100 members")
    full = await members(node, "big")
    assert len(full["members"]) == PUBLIC_MEMBERS and "truncated" not in full, full["count"]
    await join(node, "u100", "big")
    await wait_for(lambda: count_is(PUBLIC_MEMBERS + 1), timeout=5, what="101 members")
    capped = await members(node, "big")
    assert len(capped["members"]) == PUBLIC_MEMBERS and capped["truncated"] is True
    assert len({m["user_id"] for m in capped["members"]}) == PUBLIC_MEMBERS


async def test_public_answers_are_cached_for_a_second(start_node: StartNode) -> None:
    """Two reads within a second get the same answer though a member joined between; the
    change shows only once a second has passed since the first read."""
    node = start_node(None, *FAST)
    await join(node, "alice", "cached")
    started = time.monotonic()
    first, first_stats = await members(node, "cached"), await stats(node)
    await join(node, "bob", "cached")
    second, second_stats = await members(node, "cached"), await stats(node)
    within = time.monotonic() - started
    assert within < 1.0, f"the reads took {within:.2f}s: too slow to see the 1 s cache"
    assert first["count"] == 1 and second == first, (first, second)
    assert first_stats["rooms"] == {"cached": 1} and second_stats == first_stats

    async def changed() -> bool:
        return bool((await members(node, "cached"))["count"] == 2)

    await wait_for(changed, timeout=3, interval=0.05, what="the cache to expire")
    assert time.monotonic() - started >= 1.0


async def test_public_rest_off_is_404(start_node: StartNode) -> None:
    """With --public-rest false both public endpoints are 404; health still answers."""
    node = start_node(None, "--public-rest", "false", *FAST)
    await join(node, "alice", "hidden")
    for path in ("/api/stats", "/api/rooms/hidden/members"):
        answer = await raw(node.port, get(path))
        assert answer.status == 404, (path, answer)
        assert b"alice" not in answer.body and b"hidden" not in answer.body
    assert (await raw(node.port, get("/healthz"))).status == 200
