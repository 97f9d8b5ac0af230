"""nginx in front of real nodes: routing, dialects, TLS, X-Forwarded-For, drains, the retry
policy under hostile requests, and the ``roomcast cluster`` and ``roomcast drain`` commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from roomcast.cli import build_parser
from roomcast.tools.balancer import (
    FAIL_TIMEOUT,
    MAX_FAILS,
    Balancer,
    BalancerError,
    check_config,
    ensure_dev_certificate,
    find_nginx,
    render,
)
from roomcast.tools.cluster import LocalCluster
from tests.harness import Client, NodeProcess, wait_for

# The installed entry point; without one, the same main() through the interpreter.
_SCRIPT = Path(sys.executable).with_name("roomcast")
ROOMCAST = [str(_SCRIPT)] if _SCRIPT.exists() else [
    sys.executable, "-c", "from roomcast.cli import main; main()"]
FAST = ["--rate-burst", "500", "--presence-grace", "0.5"]
#: The server API key of the shared cluster's nodes: the API is on, on the internal port only.
API_KEY = "balancer-test-key-0123456789abcdef01"


def http(url: str, method: str = "GET", headers: dict[str, str] | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """(status, body) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, method=method, headers=headers or {},
                                     data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def native(url: str, user_id: str, **kwargs: Any) -> tuple[Client, dict[str, Any]]:
    """A native client on ``url`` and its welcome."""
    separator = "&" if "?" in url else "?"
    client = await Client.open(f"{url}{separator}user_id={user_id}", **kwargs)
    return client, await client.expect("welcome")


def processes_left(pids: set[int]) -> list[int]:
    """Live (not zombie) processes whose PID or process group is in ``pids``."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if state != "Z" and (int(entry.name) in pids or pgrp in pids):
            left.append(int(entry.name))
    return left


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Two nodes and Redis behind nginx, shared by the tests that leave the cluster as is."""
    find_nginx()
    local = LocalCluster(tmp_path_factory.mktemp("cluster")).start(
        nodes=2, node_flags=[*FAST, "--api-key", API_KEY])
    try:
        yield local
    finally:
        local.stop(drain=False)


def test_rendered_config_passes_nginx_t(tmp_path: Path) -> None:
    """render() lists every node and passes `nginx -t`; a broken config is one clear line."""
    _, cert, key = ensure_dev_certificate(tmp_path / "certs")
    conf = tmp_path / "nginx.conf"
    conf.write_text(render([8001, 8002, 8003], 8080, 8443, tmp_path, cert, key))
    check_config(conf, tmp_path)
    text = conf.read_text()
    servers = re.findall(r"^\s*server 127\.0\.0\.1:(\d+) max_fails=3 fail_timeout=5s;$", text,
                         re.MULTILINE)
    assert servers == ["8001", "8002", "8003"]
    assert (MAX_FAILS, FAIL_TIMEOUT) == (3, "5s")
    # Never a POST on a second node; a 503 is retried for handshakes only.
    directives = re.sub(r"#[^\n]*", "", text)  # Without the comments.
    assert "non_idempotent" not in directives
    retries = re.findall(r"proxy_next_upstream ([^;]*);", directives)
    assert retries.count("error timeout") == 1  # The http{} default, for plain requests.
    assert retries.count("error timeout http_503") == 6  # /, /ws, /ws/chat/ of both servers.
    assert "proxy_next_upstream_tries 3;" in text and "proxy_next_upstream_timeout 10s;" in text
    assert text.count("merge_slashes off;") == 2

    conf.write_text(render([8001], 8080, 8443, tmp_path, tmp_path / "missing.pem", key))
    with pytest.raises(BalancerError) as failure:
        check_config(conf, tmp_path)
    assert "\n" not in str(failure.value) and "missing.pem" in str(failure.value)


async def test_native_clients_fan_out_through_nginx(cluster: LocalCluster) -> None:
    """Two clients through nginx land on different nodes (least_conn) and share a room."""
    alice, alice_welcome = await native(cluster.ws_url, "alice")
    bob, bob_welcome = await native(cluster.ws_url, "bob")
    assert {alice_welcome["node_id"], bob_welcome["node_id"]} == {
        n.node_id for n in cluster.nodes}
    for i, client in enumerate((alice, bob)):
        assert (await client.request({"type": "join", "room": "fan", "id": i}))["type"] == "joined"
    await alice.send({"type": "publish", "room": "fan", "data": "hello"})
    message = await bob.expect("message")
    assert message["data"] == "hello" and message["from"]["user_id"] == "alice"
    await alice.close()
    await bob.close()


async def test_compat_dialects_and_page_through_nginx(cluster: LocalCluster) -> None:
    """The FastAPI endpoint, the tutorial WebSocket on '/' and the page work through nginx."""
    base = cluster.ws_url.removesuffix("/ws")
    web = await Client.open(f"{base}/ws/chat/lobby?user_id=u1&username=Alice")
    joined = await web.recv()
    assert joined["type"] == "user_joined" and joined["room_id"] == "lobby"
    assert await web.recv() == {"type": "room_members", "members": ["u1"], "count": 1}

    ann = await Client.open(f"{base}/")
    await ann.send({"type": "join", "nick": "ann"})
    info = await ann.expect("info")
    assert info["nick"] == "server" and "1 present" in info["text"]
    await ann.send({"type": "chat", "text": "hi"})
    assert await ann.expect("chat") == {"type": "chat", "nick": "ann", "text": "hi"}

    status, page = http(f"{cluster.http_url}/")
    assert status == 200 and page.startswith(b"<!")
    await web.close()
    await ann.close()


def test_only_public_http_routes_are_exposed(cluster: LocalCluster) -> None:
    """Through nginx (ws and wss ports) /metrics, /admin/ and /readyz are 404; /api/ is not."""
    assert cluster.ca_cert is not None and cluster.balancer is not None
    trusted = ssl.create_default_context(cafile=str(cluster.ca_cert))
    https_url = f"https://127.0.0.1:{cluster.balancer.https_port}"
    for base, context in ((cluster.http_url, None), (https_url, trusted)):
        assert http(f"{base}/metrics", context=context)[0] == 404
        assert http(f"{base}/readyz", context=context)[0] == 404
        assert http(f"{base}/admin/drain", "POST", {"Authorization": "Bearer x"},
                    context=context)[0] == 404
        status, body = http(f"{base}/api/stats", context=context)
        assert status == 200
        assert json.loads(body)["node_id"] in {n.node_id for n in cluster.nodes}
        assert http(f"{base}/healthz", context=context)[0] == 200
        status, library = http(f"{base}/roomcast.js", context=context)
        assert status == 200 and b"export class Roomcast" in library
    assert http(f"{cluster.nodes[0].api_url}/metrics")[0] == 200  # The internal port has it.


# --- hostile requests and the retry policy ---------------------------------------------------

async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of ``data`` sent as is to 127.0.0.1:``port``, read until the server
    closes the connection (the requests ask for that, or are ones nginx closes after)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    assert match, f"no HTTP answer to {data[:60]!r}: {reply[:200]!r}"
    return int(match[1]), body


def request_bytes(method: str, target: str, *headers: tuple[str, str], body: bytes = b"",
                  close: bool = True) -> bytes:
    """A raw HTTP/1.1 request (``Content-Length`` when there is a body)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_JSON = ("Content-Type", "application/json")
_NGINX_PAGE = b"<center>nginx</center>"
#: (what, raw request, status observed through nginx, who answers it). The node's answers are
#: transports/handshake.py screen_head (405 with a body, 413, 431) and its GET-only routes.
HOSTILE: list[tuple[str, bytes, int, str]] = [
    ("POST /api/stats with a body",
     request_bytes("POST", "/api/stats", _JSON, body=b'{"a": 1}'), 405, "node"),
    ("POST /api/publish with a body",
     request_bytes("POST", "/api/publish", _JSON, ("Authorization", f"apikey {API_KEY}"),
                   body=b'{"room": "canary", "data": "hostile"}'), 405, "node"),
    ("PUT /api/stats", request_bytes("PUT", "/api/stats", body=b"{}"), 405, "node"),
    ("DELETE /api/rooms/canary/members",
     request_bytes("DELETE", "/api/rooms/canary/members"), 405, "node"),
    ("GET /api/stats with a body", request_bytes("GET", "/api/stats", body=b"x" * 1000), 413,
     "node"),
    ("chunked POST /api/publish",
     request_bytes("POST", "/api/publish", _JSON, ("Transfer-Encoding", "chunked"))
     + b"7\r\n{\"a\":1}\r\n0\r\n\r\n", 405, "node"),
    ("malformed request line", b"GARBAGE\r\n\r\n", 400, "nginx"),
    ("a header line over nginx's 8 KiB buffer",
     request_bytes("GET", "/api/stats", ("X-Big", "a" * 20000)), 400, "nginx"),
    ("a 20 KiB head of short headers",
     request_bytes("GET", "/api/stats", *((f"X-H{i}", "v" * 90) for i in range(200))), 431,
     "node"),
    ("POST //api/admin/drain",
     request_bytes("POST", "//api/admin/drain", ("Authorization", "Bearer x")), 404, "nginx"),
    ("POST //admin/drain", request_bytes("POST", "//admin/drain"), 404, "nginx"),
    ("POST /admin/drain", request_bytes("POST", "/admin/drain"), 404, "nginx"),
    ("GET /metrics", request_bytes("GET", "/metrics"), 404, "nginx"),
]


def logged_statuses(line: str) -> list[str]:
    """The status nginx answered and every upstream's status in one access log line."""
    answered = re.search(r'" (\d{3}) ', line)
    upstream = re.search(r"upstream_status=(.*) request_time=", line)
    return ([answered[1]] if answered else []) + (
        upstream[1].split(", ") if upstream else [])


def metric_values(api_url: str, name: str) -> dict[str, float]:
    """The samples of counter ``name`` on a node's internal port, by label text."""
    status, body = http(f"{api_url}/metrics")
    assert status == 200
    found = re.findall(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", body.decode(), re.MULTILINE)
    return {labels: float(value) for labels, value in found}


async def handshakes(url: str, count: int, prefix: str) -> list[str]:
    """Open ``count`` native connections through ``url`` at once; the node id of each, or the
    error that refused it (a 502 as ``InvalidStatus``); all closed again."""
    results = await asyncio.gather(*(native(url, f"{prefix}-{i}") for i in range(count)),
                                   return_exceptions=True)
    outcomes = []
    for result in results:
        if isinstance(result, BaseException):
            outcomes.append(f"failed: {result!r}")
        else:
            client, welcome = result
            outcomes.append(welcome["node_id"])
            await client.close()
    return outcomes


async def test_hostile_requests_through_nginx_take_no_node_out(cluster: LocalCluster) -> None:
    """Hostile requests through nginx get 4xx while a canary loses nothing, new handshakes never
    get a 502, and nginx neither retries them nor marks a node failed."""
    assert cluster.balancer is not None
    port = cluster.balancer.http_port
    access_log = cluster.dir / "nginx" / "access.log"
    error_log = cluster.dir / "nginx" / "error.log"
    log_start, errors_start = access_log.stat().st_size, error_log.stat().st_size
    refused_before = [metric_values(n.api_url, "roomcast_http_refused_total")
                      for n in cluster.nodes]
    node_ids = {n.node_id for n in cluster.nodes}

    room, count = "canary", 150
    subscriber, _ = await native(cluster.ws_url, "canary-sub")
    assert (await subscriber.request({"type": "join", "room": room, "id": 0}))["type"] == "joined"
    publisher, _ = await native(cluster.ws_url, "canary-pub")
    acked: list[int] = []

    async def publish() -> None:
        for seq in range(1, count + 1):
            ack = await publisher.request({"type": "publish", "room": room, "data": seq,
                                           "id": seq})
            assert ack["type"] == "published", ack
            acked.append(seq)
            await asyncio.sleep(0.01)
        ack = await publisher.request({"type": "publish", "room": room, "data": "end",
                                       "id": "end"})
        assert ack["type"] == "published", ack

    async def receive() -> list[Any]:
        got: list[Any] = []
        while not got or got[-1] != "end":
            got.append((await subscriber.expect("message", timeout=10, room=room))["data"])
        return got

    async def attack(rounds: int) -> list[tuple[str, int, str]]:
        answers = []
        for _ in range(rounds):
            for what, data, _, _ in HOSTILE:
                status, body = await raw_request(port, data)
                answers.append((what, status, "nginx" if _NGINX_PAGE in body else "node"))
        return answers

    rounds = 3
    publishing, receiving = asyncio.ensure_future(publish()), asyncio.ensure_future(receive())
    answers, during = await asyncio.gather(attack(rounds), handshakes(cluster.ws_url, 20, "d"))
    after = await handshakes(cluster.ws_url, 20, "a")
    await asyncio.wait_for(publishing, 30)
    received = await asyncio.wait_for(receiving, 10)

    assert answers == [(what, status, by) for what, _, status, by in HOSTILE] * rounds
    assert all(400 <= status < 500 for _, status, _ in answers)
    assert set(during + after) <= node_ids, [o for o in during + after if o not in node_ids]
    assert len(set(during + after)) == 2  # Both nodes kept getting new connections.
    # Every acknowledged message exactly once, in order, then the end marker.
    assert received == [*acked, "end"] and len(acked) == count

    lines = access_log.read_text()[log_start:].splitlines()
    assert lines and not [line for line in lines if any(
        status.startswith("5") for status in logged_statuses(line))]
    # No request was tried on a second node.
    assert not [line for line in lines if re.search(r"upstream=[^ ]+, ", line)]
    errors = error_log.read_text()[errors_start:]
    assert "temporarily disabled" not in errors and "no live upstreams" not in errors
    # The node's clean refusals are counted (roomcast_http_refused_total{status}).
    refused: dict[str, float] = {}
    for node, before in zip(cluster.nodes, refused_before, strict=True):
        for labels, value in metric_values(node.api_url, "roomcast_http_refused_total").items():
            refused[labels] = refused.get(labels, 0) + value - before.get(labels, 0)
    # POST, POST, PUT, DELETE and the chunked POST (405), GET with a body (413), the 20 KiB head
    # (431); what nginx answered never reached a node.
    assert {k: v for k, v in refused.items() if v} == {
        'status="405"': 5 * rounds, 'status="413"': rounds, 'status="431"': rounds}
    await subscriber.close()
    await publisher.close()


def test_internal_port_is_not_reachable_through_nginx(cluster: LocalCluster) -> None:
    """The internal port's routes answer on it and never through nginx, whose upstreams are the
    client ports only: POST /api/publish with a good key is 405 from a client port."""
    assert cluster.balancer is not None
    node = cluster.nodes[0]
    key = {"Authorization": f"apikey {API_KEY}", "Content-Type": "application/json"}
    publish = json.dumps({"room": "internal", "data": "x"}).encode()

    def post(url: str) -> tuple[int, bytes]:
        request = urllib.request.Request(url, method="POST", headers=key, data=publish)
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    assert post(f"{node.api_url}/api/publish")[0] == 200  # The API is on, internally.
    status, body = post(f"{cluster.http_url}/api/publish")
    assert status == 405 and body.startswith(b"only GET is served on this port")
    assert post(f"{cluster.http_url}/api/info")[0] == 405
    assert http(f"{node.api_url}/livez")[0] == 200
    for path in ("/livez", "/metrics", "/readyz", "/api/info"):
        assert http(f"{cluster.http_url}{path}")[0] == 404, path
    text = cluster.balancer.conf.read_text()
    upstreams = {int(p) for p in re.findall(r"^\s*server 127\.0\.0\.1:(\d+) ", text, re.M)}
    assert upstreams == {n.port for n in cluster.nodes}
    assert not upstreams & {n.api_port for n in cluster.nodes}


class DroppingProxy:
    """127.0.0.1:<port> in front of a node, resetting every request that has a body without an
    answer, as nodes did before their client port answered such requests; anything else is
    passed through both ways (WebSocket handshakes included)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> DroppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            head = await reader.readuntil(b"\r\n\r\n")
            lowered = head.lower()
            if b"transfer-encoding:" in lowered or re.search(rb"content-length: *[1-9]", lowered):
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # An RST, no answer.
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            up_writer.write(head)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(OSError):
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


async def test_a_node_that_drops_requests_is_not_taken_out(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Behind nodes that reset requests with a body: a POST is tried on one node only, a GET on
    both, and no handshake after them gets a 502 (the 502 storm of issue 11)."""
    proxies = [await DroppingProxy(n.port).start() for n in cluster.nodes]
    _, cert, key = ensure_dev_certificate(tmp_path / "certs")
    balancer = Balancer(tmp_path / "nginx", [p.port for p in proxies], cert=cert, key=key)
    await asyncio.to_thread(balancer.start)
    try:
        post = request_bytes("POST", "/api/stats", _JSON, body=b'{"a": 1}')
        get = request_bytes("GET", "/api/stats", body=b"x")
        # The hostile client gets its 502; a node counts at most 2 failures (< MAX_FAILS).
        assert [(await raw_request(balancer.http_port, data))[0] for data in (post, get)] == [
            502, 502]
        outcomes = await handshakes(f"ws://127.0.0.1:{balancer.http_port}/ws", 10, "dropped")
        assert set(outcomes) == {n.node_id for n in cluster.nodes}, outcomes
        log = (tmp_path / "nginx" / "access.log").read_text().splitlines()
        tried = [line.count("127.0.0.1:") for line in log if "/api/stats" in line]
        assert tried == [1, 2]  # upstream=… lists every node a request was sent to.
        assert "temporarily disabled" not in (tmp_path / "nginx" / "error.log").read_text()
    finally:
        await asyncio.to_thread(balancer.stop)
        for proxy in proxies:
            await proxy.close()


async def test_redis_outage_503s_take_no_node_out(tmp_path: Path) -> None:
    """While Redis is down, /api/stats answers 503 through nginx on the first node tried, and
    handshakes still reach both nodes: a plain request's 503 is an answer, not a failure."""
    with LocalCluster(tmp_path).start(nodes=2, node_flags=FAST) as local:
        assert local.redis_proc is not None
        local.redis_proc.kill()
        local.redis_proc.wait(timeout=5)
        await wait_for(lambda: all(http(f"{n.api_url}/readyz")[0] == 503 for n in local.nodes),
                       timeout=5, what="both nodes unready")
        statuses = [http(f"{local.http_url}/api/stats")[0] for _ in range(2 * MAX_FAILS)]
        assert statuses == [503] * (2 * MAX_FAILS)
        outcomes = await handshakes(local.ws_url, 10, "outage")
        assert set(outcomes) == {n.node_id for n in local.nodes}, outcomes
        lines = (tmp_path / "nginx" / "access.log").read_text().splitlines()
        assert [line.count("127.0.0.1:") for line in lines if "/api/stats" in line] == [1] * (
            2 * MAX_FAILS)
        local.stop(drain=False)


async def test_wss_with_the_dev_ca(cluster: LocalCluster) -> None:
    """wss:// through nginx works when the client trusts the generated CA, and only then."""
    assert cluster.ca_cert is not None
    trusted = ssl.create_default_context(cafile=str(cluster.ca_cert))
    client, welcome = await native(cluster.wss_url, "tls", ssl=trusted)
    assert welcome["node_id"] in {n.node_id for n in cluster.nodes}
    await client.request({"type": "join", "room": "tls", "id": 1})
    await client.send({"type": "publish", "room": "tls", "data": "secret"})
    assert (await client.expect("message"))["data"] == "secret"
    await client.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        await Client.open(cluster.wss_url, ssl=ssl.create_default_context())


async def test_forwarded_for_names_the_address_nginx_saw(cluster: LocalCluster) -> None:
    """The node logs the client address nginx saw, never nginx's own or a spoofed header."""
    # nginx sends "203.0.113.7, 127.0.0.2": the node believes only the hop its trusted proxy
    # (127.0.0.1) added. A direct peer's header is ignored. Distinct loopback source addresses
    # tell the client apart from nginx.
    spoof = {"X-Forwarded-For": "203.0.113.7"}
    via_nginx, welcome = await native(cluster.ws_url, "xff", additional_headers=spoof,
                                      local_addr=("127.0.0.2", 0))
    node = next(n for n in cluster.nodes if n.node_id == welcome["node_id"])
    direct, direct_welcome = await native(f"ws://127.0.0.1:{node.port}/ws", "direct",
                                          additional_headers=spoof, local_addr=("127.0.0.3", 0))

    def peer(conn_id: str) -> str | None:
        lines = [line for line in node.logged("connection opened")
                 if line.get("conn_id") == conn_id]
        return lines[0]["peer"] if lines else None

    await wait_for(lambda: peer(direct_welcome["conn_id"]) is not None, timeout=5,
                   what="'connection opened' log lines")
    assert peer(welcome["conn_id"]) == "127.0.0.2"
    assert peer(direct_welcome["conn_id"]) == "127.0.0.3"
    await via_nginx.close()
    await direct.close()


async def test_draining_node_gets_no_new_connections(tmp_path: Path) -> None:
    """In a drain delay, 20 new connections all reach the other node; the drainer's get 1012."""
    with LocalCluster(tmp_path).start(
        nodes=2, node_flags=[*FAST, "--drain-delay", "3", "--drain-window", "0.5"]
    ) as local:
        draining, other = local.nodes
        before = [await native(local.ws_url, f"before-{i}") for i in range(2)]
        assert {welcome["node_id"] for _, welcome in before} == {draining.node_id, other.node_id}
        os.kill(draining.pid, signal.SIGTERM)
        signalled = time.monotonic()
        await wait_for(lambda: http(f"{draining.http_url}/readyz")[0] == 503, timeout=2,
                       what="readiness off")
        opened = await asyncio.gather(*(native(local.ws_url, f"new-{i}") for i in range(20)))
        assert time.monotonic() - signalled < 3.0  # All inside the drain delay.
        assert [welcome["node_id"] for _, welcome in opened] == [other.node_id] * 20

        on_draining = next(c for c, w in before if w["node_id"] == draining.node_id)
        hint = await on_draining.expect("reconnect", timeout=10)
        assert 0 <= hint["retry_after_ms"] <= 1000
        assert await on_draining.closed() == 1012
        assert draining.proc is not None and draining.proc.wait(timeout=20) == 0
        for client, _ in [*before, *opened]:
            await client.close()
        # nginx logs a WebSocket when it ends: some handshakes were refused, then moved on.
        access_log = tmp_path / "nginx" / "access.log"
        await wait_for(lambda: access_log.read_text().count("HTTP/1.1\" 101 ") == 22, timeout=5,
                       what="22 WebSocket lines in nginx's access log")
        assert "upstream_status=503, 101" in access_log.read_text()
        local.stop(drain=False)


async def test_killed_node_is_routed_around(tmp_path: Path) -> None:
    """After kill_node() (SIGKILL), new connections through nginx reach the surviving node."""
    with LocalCluster(tmp_path).start(nodes=2, node_flags=FAST) as local:
        local.kill_node(0)
        opened = [await native(local.ws_url, f"k{i}") for i in range(4)]
        assert [welcome["node_id"] for _, welcome in opened] == [local.nodes[1].node_id] * 4
        for client, _ in opened:
            await client.close()
        local.stop(drain=False)


async def read_until(
    stream: asyncio.StreamReader, seen: list[str], pattern: str, seconds: float
) -> str:
    """The first line of ``stream`` matching ``pattern``, read within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            raw = await asyncio.wait_for(stream.readline(), max(left, 0.01))
        except TimeoutError:
            raise TimeoutError(f"no line matching {pattern!r}; output:\n" + "".join(seen)) from None
        if not raw:
            raise EOFError(f"output ended before {pattern!r}:\n" + "".join(seen))
        seen.append(raw.decode())
        if re.search(pattern, seen[-1]):
            return seen[-1]


async def roomcast(*args: str) -> asyncio.subprocess.Process:
    """The ``roomcast`` command as a child process, stdout and stderr merged into one pipe."""
    return await asyncio.create_subprocess_exec(
        *ROOMCAST, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def test_cluster_up_restart_and_ctrl_c(tmp_path: Path) -> None:
    """`cluster up` serves its URLs, `cluster restart` replaces every node, SIGINT exits 0."""
    directory = tmp_path / "c"
    up = await roomcast("cluster", "up", "--nodes", "2", "--dir", str(directory), "--",
                        "--drain-delay", "0.2", "--drain-window", "0.2", *FAST)
    assert up.stdout is not None
    seen: list[str] = []
    pids: set[int] = set()
    try:
        ws_url = (await read_until(up.stdout, seen, r"^\s+ws\s+ws://", 30)).split()[1]
        wss_line = await read_until(up.stdout, seen, r"^\s+wss\s+", 1)
        assert wss_line.split()[1].startswith("wss://") and "ca.pem" in wss_line
        await read_until(up.stdout, seen, r"^state: ", 5)
        state = json.loads((directory / "state.json").read_text())
        pids = {state["redis"]["pid"], state["balancer"]["pid"], up.pid,
                *(n["pid"] for n in state["nodes"])}
        old_ids = {n["node_id"] for n in state["nodes"]}

        alice, _ = await native(ws_url, "alice")
        bob, _ = await native(ws_url, "bob")
        for client in (alice, bob):
            await client.request({"type": "join", "room": "up", "id": 1})
        await alice.send({"type": "publish", "room": "up", "data": "via up"})
        assert (await bob.expect("message"))["data"] == "via up"

        restart = await roomcast("cluster", "restart", "--dir", str(directory))
        output, _ = await asyncio.wait_for(restart.communicate(), 60)
        assert restart.returncode == 0, output.decode()
        steps = output.decode().splitlines()
        assert [line.split(":")[0] for line in steps[:-1]] == ["node 1/2"] * 3 + ["node 2/2"] * 3
        assert steps[-1].startswith("rolling restart done")
        assert await alice.closed() == 1012 and await bob.closed() == 1012
        state = json.loads((directory / "state.json").read_text())
        new_ids = {n["node_id"] for n in state["nodes"]}
        assert len(new_ids) == 2 and not new_ids & old_ids
        pids |= {n["pid"] for n in state["nodes"]}
        carol, welcome = await native(ws_url, "carol")
        assert welcome["node_id"] in new_ids
        await carol.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            up.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(up.wait(), 30)
    await read_until(up.stdout, seen, r"^stopped$", 5)
    assert code == 0, "".join(seen)
    assert processes_left(pids) == []


def test_drain_command(start_node: Callable[..., NodeProcess],
                       capsys: pytest.CaptureFixture[str]) -> None:
    """`roomcast drain`: a wrong token exits 1 with one line; the right one drains the node."""
    node = start_node(None, "--admin-token", "s3cret", "--drain-delay", "0", "--drain-window",
                      "0")
    parser = build_parser()
    wrong = parser.parse_args(["drain", node.api, "--token", "wrong"])
    assert wrong.func(wrong) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"roomcast drain: {node.api}/admin/drain: HTTP 401 Unauthorized: "
                   "missing or wrong bearer token\n")

    right = parser.parse_args(["drain", node.api, "--token", "s3cret"])
    assert right.func(right) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"status": "draining", "node_id": node.node_id}
    assert err == ""
    assert node.wait(timeout=20) == 0
