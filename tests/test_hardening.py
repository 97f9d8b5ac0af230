"""Abuse and bad input against real node processes: a bounded write path, a frame budget that
control frames share and that is charged as frames arrive, and bad input that stays bad_request.

The raw clients here speak WebSocket over a bare socket (websockets' sans-I/O ``ClientProtocol``)
so that they can do what no well-behaved library does: never read, or write pings as fast as the
socket takes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import statistics
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from roomcast.transports.websocket import READ_SLICE
from tests.harness import Client, NodeProcess, RedisServer, native, wait_for

MiB = 1024 * 1024


def rss_bytes(node: NodeProcess) -> int:
    """The node process's resident set size, from /proc/<pid>/status (VmRSS, in kB)."""
    assert node.proc is not None
    with open(f"/proc/{node.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


class RawClient:
    """A WebSocket client on a bare socket that reads only when told to.

    With a small receive buffer (``rcvbuf``), what it does not read stays in the node.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: ClientProtocol) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol
        self.frames: list[Frame] = []
        self.response: Response | None = None

    @classmethod
    async def open(cls, url: str, rcvbuf: int | None = None) -> RawClient:
        uri = parse_uri(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # Before connect(): the window is negotiated at the handshake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port)), 10)
        # A small StreamReader limit: it stops reading the socket at twice this much buffered.
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        protocol = ClientProtocol(uri, max_size=None)
        protocol.send_request(protocol.connect())
        client = cls(reader, writer, protocol)
        client._flush()
        async with asyncio.timeout(10):
            while client.response is None:
                await client._read_some()
        assert client.response.status_code == 101, client.response
        return client

    def _flush(self) -> None:
        data = self.protocol.data_to_send()
        if data:
            self.writer.write(b"".join(data))

    async def _read_some(self) -> bool:
        """Read what the socket has; False at the end of the stream."""
        data = await self.reader.read(65536)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self.frames.append(event)
            elif isinstance(event, Response):
                self.response = event
        self._flush()  # Pongs to the node's keepalive pings, the closing reply.
        return bool(data)

    async def send_json(self, obj: Any) -> None:
        self.protocol.send_text(json.dumps(obj).encode())
        self._flush()
        await self.writer.drain()

    async def close_code(self, timeout: float) -> int | None:
        """Read everything up to the node's close frame; its code (None: the stream ended)."""
        async with asyncio.timeout(timeout):
            while self.protocol.close_rcvd is None and await self._read_some():
                pass
        return None if self.protocol.close_rcvd is None else self.protocol.close_rcvd.code

    def abort(self) -> None:
        self.writer.transport.abort()


# --- item 2: every write to a client is bounded --------------------------------------------


async def test_history_requests_that_are_never_read_cannot_grow_the_node(
    start_node: Callable[..., NodeProcess],
) -> None:
    """Two clients that ask for a large history and never read are closed 4000 while the node's
    RSS stays bounded; a third client is served throughout and pages through the whole history."""
    node = start_node(None, "--history-size", "400", "--close-timeout", "60",
                      "--rate-limit", "1000", "--rate-burst", "1000")
    publisher = await native(node, "pub")
    blob = "x" * 32_000
    for i in range(400):
        await publisher.send({"type": "publish", "room": "big", "data": {"n": i, "blob": blob}})
    last = await publisher.request({"type": "publish", "room": "big", "data": "end", "id": "e"})
    assert last["offset"] == 401
    baseline = rss_bytes(node)

    hogs = [await RawClient.open(node.ws(f"/ws?user_id=hog{i}"), rcvbuf=4096) for i in range(2)]
    bystander = await native(node, "bystander")
    peak, latencies = baseline, []
    for round_ in range(40):
        for hog in hogs:
            await hog.send_json({"type": "history", "room": "big", "id": round_})
        started = time.monotonic()
        pong = await bystander.request({"type": "ping", "id": round_}, timeout=5)
        latencies.append(time.monotonic() - started)
        assert pong["type"] == "pong"
        peak = max(peak, rss_bytes(node))
        # Checked every round, so that a node without the bound fails here, long before it
        # could exhaust the machine's memory.
        assert peak < 200 * MiB, f"RSS {peak / MiB:.0f} MiB after round {round_}"

    codes = [await hog.close_code(timeout=30) for hog in hogs]
    assert codes == [4000, 4000]

    # The history comes in pages of at most --max-reply-size bytes; 'more' until the end.
    messages: list[dict[str, Any]] = []
    pages, since = 0, None
    while True:
        request: dict[str, Any] = {"type": "history", "room": "big", "id": f"p{pages}"}
        if since is not None:
            request["since"] = since
        page = await bystander.request(request, timeout=10)
        pages += 1
        messages += page["messages"]
        if not page.get("more"):
            break
        assert pages < 100, "paging must end"
        since = {"offset": page["messages"][-1]["offset"], "epoch": page["epoch"]}
    assert [m["offset"] for m in messages] == list(range(2, 402))
    final = rss_bytes(node)
    print(f"\nRSS baseline {baseline / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, "
          f"final {final / MiB:.1f} MiB; hogs closed {codes}; bystander ping p50 "
          f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; "
          f"history in {pages} pages")
    for hog in hogs:
        hog.abort()


# --- item 3: control frames share the budget -------------------------------------------------

PING_BATCH = 1000


def ping_frames(count: int) -> bytes:
    """``count`` masked ping frames, as a client sends them (RFC 6455 section 5.5.2)."""
    return b"".join(
        Frame(Opcode.PING, i.to_bytes(4, "big")).serialize(mask=True, extensions=[])
        for i in range(count)
    )


async def test_a_ping_flood_is_closed_1008_and_the_node_stays_responsive(
    start_node: Callable[..., NodeProcess],
) -> None:
    """A client that sends pings as fast as it can while reading its pongs is closed with 1008;
    a canary publisher and subscriber on the node get every message, promptly, and stay open."""
    node = start_node(None)
    publisher, subscriber = await native(node, "canary-pub"), await native(node, "canary-sub")
    await subscriber.request({"type": "join", "room": "canary", "id": "j"})
    flooder = await RawClient.open(node.ws("/ws?user_id=pinger"))
    batch = ping_frames(PING_BATCH)
    sent = 0
    flood_done = asyncio.Event()

    async def flood() -> None:
        nonlocal sent
        try:
            # Bounded: 2 million pings or 15 s, whichever comes first.
            deadline = time.monotonic() + 15
            while (flooder.protocol.close_rcvd is None and sent < 2_000_000
                   and time.monotonic() < deadline):
                flooder.writer.write(batch)
                await flooder.writer.drain()
                sent += PING_BATCH
                await asyncio.sleep(0)  # Let the pongs be read: drain() need not yield.
        except (ConnectionError, OSError):
            pass
        finally:
            flood_done.set()

    async def read_pongs() -> int | None:
        with contextlib.suppress(ConnectionError, OSError):
            return await flooder.close_code(timeout=20)
        return None

    async def canary() -> list[float]:
        latencies = []
        for i in range(40):
            ack = await publisher.request(
                {"type": "publish", "room": "canary", "data": {"n": i, "t": time.time()},
                 "id": i}, timeout=5)
            assert ack["type"] == "published", ack
            message = await subscriber.expect("message", timeout=5)
            assert message["data"]["n"] == i
            latencies.append(time.time() - message["data"]["t"])
            if i >= 20:
                await flood_done.wait()
            await asyncio.sleep(0.02)  # Pacing, not a wait for something to happen.
        return latencies

    flood_task = asyncio.ensure_future(flood())
    code, latencies = await asyncio.gather(read_pongs(), canary())
    await flood_task
    pongs = sum(1 for frame in flooder.frames if frame.opcode is Opcode.PONG)
    print(f"\npings written before the close {sent}, pongs received {pongs}, close {code}; "
          f"canary latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms")
    assert code == 1008
    assert flooder.protocol.close_rcvd is not None
    assert flooder.protocol.close_rcvd.reason == "rate limit exceeded"
    # The library answers the pings it parses before the node sees them, so the pings of the
    # slice of a read that overdrew the budget are answered; nothing after that slice is read.
    assert pongs <= READ_SLICE * PING_BATCH // len(batch) + 100, "cut off within one slice"
    assert max(latencies) < 0.5
    for client in (publisher, subscriber):
        assert client.ws.close_code is None, "the canary is never closed"
        assert (await client.request({"type": "ping", "id": "after"}))["type"] == "pong"
    flooder.abort()


# --- item 5: a stall does not turn clients into flooders -------------------------------------


async def test_a_redis_stall_does_not_charge_the_backlog_to_a_steady_publisher(
    start_node: Callable[..., NodeProcess], redis_server: RedisServer,
) -> None:
    """A client publishing 20 msg/s under --rate-limit 30 is never refused nor closed when Redis
    is stopped for 3 s: every publish gets 'published' or 'unavailable'."""
    node = start_node(redis_server.url, "--rate-limit", "30", "--rate-burst", "10")
    client = await native(node, "steady")
    assert redis_server.proc is not None
    replies: dict[int, dict[str, Any]] = {}

    async def read() -> None:
        while True:
            reply = await client.recv(timeout=30)
            replies[reply["id"]] = reply

    reader = asyncio.ensure_future(read())
    total, stopped_at, stop_started = 120, 30, 0.0
    try:
        for i in range(total):
            if i == stopped_at:
                redis_server.proc.send_signal(signal.SIGSTOP)
                stop_started = time.monotonic()
            if i > stopped_at and time.monotonic() - stop_started >= 3:
                redis_server.proc.send_signal(signal.SIGCONT)
                stopped_at = total  # Resumed once.
            await client.send({"type": "publish", "room": "steady", "data": i, "id": i})
            await asyncio.sleep(0.05)  # 20 messages a second.
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    await wait_for(lambda: len(replies) == total or reader.done(), timeout=20,
                   what="a reply to every publish")
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await reader
    kinds = [replies[i]["type"] if replies[i]["type"] != "error" else replies[i]["code"]
             for i in range(total) if i in replies]
    print(f"\nreplies: {', '.join(f'{k} {kinds.count(k)}' for k in sorted(set(kinds)))}")
    assert client.ws.close_code is None, "never closed"
    assert len(replies) == total
    assert set(kinds) <= {"published", "unavailable"}, kinds


# --- item 8: bad input stays bad_request -------------------------------------------------------


def nested(depth: int) -> str:
    """JSON text of a number inside ``depth`` arrays (built as text: json.dumps would recurse)."""
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize("depth", [65, 254, 1023])
async def test_deeply_nested_data_is_bad_request_not_an_internal_error(
    node: NodeProcess, depth: int,
) -> None:
    """Publish data nested deeper than 64 levels is bad_request with a reason; the connection
    stays open and nothing is published (native and FastAPI dialects)."""
    client = await native(node, "deep")
    await client.request({"type": "join", "room": "d", "id": "j"})
    frame = '{"type":"publish","room":"d","id":"p","data":' + nested(depth) + "}"
    await client.ws.send(frame)
    error = await client.expect("error", timeout=5)
    assert (error["code"], error["id"]) == ("bad_request", "p")
    assert "64" in error["message"]
    web = await Client.open(node.ws("/ws/chat/d?user_id=web"))
    await web.ws.send('{"type":"message","content":' + nested(depth) + "}")
    assert "64" in (await web.expect("error", timeout=5))["message"]
    await web.ws.send('{"type":' + nested(depth) + "}")  # An unknown type, oddly shaped.
    assert "unknown" in (await web.expect("error", timeout=5))["message"]
    ack = await client.request({"type": "publish", "room": "d", "data": json.loads(nested(64)),
                                "id": "ok"})
    assert ack["type"] == "published" and ack["offset"] == 1, "only the legal one was published"
    assert node.logged("handler crashed") == []


@pytest.fixture(params=["embedded", "cluster"])
def any_node(request: pytest.FixtureRequest,
             start_node: Callable[..., NodeProcess]) -> NodeProcess:
    """One node in embedded mode, or on a real redis-server."""
    url = None
    if request.param == "cluster":
        url = request.getfixturevalue("redis_server").url
    return start_node(url, "--rate-burst", "500")


async def test_since_offsets_are_bounded_and_answered_alike_in_both_modes(
    any_node: NodeProcess,
) -> None:
    """since.offset up to 2^63-1 gets recovered:false (no such offset), the same in memory and
    Redis mode; from 2^63 on (2^64-1 included) it is bad_request, for join and history."""
    client = await native(any_node, "since")
    ack = await client.request({"type": "publish", "room": "s", "data": 1, "id": "p"})
    epoch = ack["epoch"]
    top = {"offset": 2**63 - 1, "epoch": epoch}
    history = await client.request({"type": "history", "room": "s", "since": top, "id": "h"})
    assert (history["type"], history["recovered"], history["messages"]) == ("history", False, [])
    joined = await client.request({"type": "join", "room": "s", "since": top, "id": "j"})
    assert (joined["type"], joined["recovered"]) == ("joined", False)
    for offset in (2**63, 2**64 - 1):
        for kind in ("history", "join"):
            since = {"offset": offset, "epoch": epoch}
            error = await client.request({"type": kind, "room": "t", "since": since, "id": kind})
            assert (error["type"], error["code"]) == ("error", "bad_request"), error
            assert "9223372036854775807" in error["message"]


BAD_NAMES = ["nul\x00", "line\nbreak", "bidi\u202eevil", "zero\u200bwidth", "sep\u2028x"]


@pytest.mark.parametrize("bad", BAD_NAMES)
@pytest.mark.parametrize("field", ["user_id", "username"])
@pytest.mark.parametrize("path", ["/ws", "/ws/chat/lobby"])
async def test_a_query_identity_that_is_not_printable_gets_http_400(
    node: NodeProcess, path: str, field: str, bad: str,
) -> None:
    """A user_id or username with a control, format or separator character is refused at the
    handshake with HTTP 400 and a one-line reason naming the field."""
    query = urllib.parse.urlencode({"user_id": "u1", "username": "U", field: bad})
    with pytest.raises(InvalidStatus) as refused:
        await Client.open(node.ws(f"{path}?{query}"))
    response = refused.value.response
    assert response.status_code == 400
    body = response.body.decode()
    assert body.startswith(field) and body.count("\n") == 1, body


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_a_native_nick_that_is_not_printable_is_bad_request(
    node: NodeProcess, bad: str,
) -> None:
    """A join whose nick holds a control, format or separator character is bad_request, and the
    room is not joined; a printable nick with spaces and emoji is accepted."""
    client = await native(node, "nick")
    error = await client.request({"type": "join", "room": "n", "nick": bad, "id": 1})
    assert (error["type"], error["code"], error["id"]) == ("error", "bad_request", 1)
    assert "nick" in error["message"]
    presence = await client.request({"type": "presence", "room": "n", "id": 2})
    assert presence["members"] == []
    joined = await client.request({"type": "join", "room": "n", "nick": "Zoë 🎉 x", "id": 3})
    assert joined["type"] == "joined"


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_a_tutorial_nick_that_is_not_printable_is_refused_with_1008(
    node: NodeProcess, bad: str,
) -> None:
    """The tutorial dialect answers a nick with a control, format or separator character with
    its error envelope and closes 1008 'invalid nick'."""
    client = await Client.open(node.ws("/"))
    await client.send({"type": "join", "nick": bad})
    error = await client.expect("error")
    assert error["nick"] == "server" and "printable" in error["text"]
    assert await client.closed() == 1008
    assert client.ws.close_reason == "invalid nick"
