"""nginx in front of real nodes: routing, dialects, TLS, X-Forwarded-For, drains, and the
``roomcast cluster`` and ``roomcast drain`` commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
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
    local = LocalCluster(tmp_path_factory.mktemp("cluster")).start(nodes=2, node_flags=FAST)
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
    servers = re.findall(r"^\s*server 127\.0\.0\.1:(\d+) max_fails=1 fail_timeout=2s;$", text,
                         re.MULTILINE)
    assert servers == ["8001", "8002", "8003"]
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in text

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
    assert http(f"{cluster.nodes[0].api_url}/metrics")[0] == 200  # The internal port has it.


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
