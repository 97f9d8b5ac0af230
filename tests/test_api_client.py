"""The server API's Python clients (roomcast.tools.api) and `roomcast api`, against real nodes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from roomcast.tools.api import ApiClient, ApiError, AsyncApiClient
from tests.harness import ROOT, NodeProcess, RedisServer, native, wait_for

KEY = "k" * 32
OTHER_KEY = "o" * 32
NAMESPACES = """
[namespaces.chat]
join = "anyone"

[namespaces.news]
join = "anyone"
publish = "server"
"""

#: call(method_name, *args, **kwargs) -> the reply: one client's methods, awaited either way.
Call = Callable[..., Awaitable[Any]]


@pytest.fixture
def api_node(start_node: Callable[..., NodeProcess], tmp_path: Path) -> NodeProcess:
    """An embedded node with the API on, two keys, and the namespaces chat and news."""
    (tmp_path / "ns.toml").write_text(NAMESPACES)
    return start_node(None, "--api-key", f"{KEY},{OTHER_KEY}", "--presence-grace", "0.3",
                      "--namespaces-file", str(tmp_path / "ns.toml"))


@contextlib.asynccontextmanager
async def client_calls(kind: str, url: str, key: str = KEY) -> Any:
    """A ``Call`` on ApiClient (in a thread: it blocks) or on AsyncApiClient."""
    if kind == "sync":
        api = ApiClient(url, key, timeout=5)
        yield lambda name, *a, **kw: asyncio.to_thread(getattr(api, name), *a, **kw)
        return
    async with AsyncApiClient(url, key, timeout=5) as aapi:
        yield lambda name, *a, **kw: getattr(aapi, name)(*a, **kw)


def history_offsets(node: NodeProcess, room: str) -> list[int]:
    reply = ApiClient(node.api, OTHER_KEY, timeout=5).history(room)
    return [m["offset"] for m in reply["messages"]]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_every_method_round_trips(api_node: NodeProcess, kind: str) -> None:
    """Each method of the client does what the API says, seen from a member's connection."""
    alice = await native(api_node, "alice", "Alice")
    joined = await alice.request({"type": "join", "room": "chat:lobby", "nick": "al", "id": 1})
    assert joined["type"] == "joined"
    async with client_calls(kind, api_node.api) as call:
        first = await call("publish", "chat:lobby", {"text": "hi"})
        assert first == {"offset": 1, "epoch": joined["epoch"]}
        seen = await alice.expect("message", offset=1)
        assert seen["data"] == {"text": "hi"}
        assert seen["from"] == {"user_id": "", "username": "server"}

        keyed = await call("publish", "chat:lobby", "once", "order-1")
        assert await call("publish", "chat:lobby", "once", "order-1") == {**keyed,
                                                                           "duplicate": True}
        spread = await call("broadcast", ["chat:lobby", "nope:x"], "both")
        assert spread["results"][0] == {"room": "chat:lobby", "offset": 3,
                                         "epoch": joined["epoch"]}
        assert spread["results"][1]["error"]["code"] == "unknown_namespace"

        everything = await call("history", "chat:lobby")
        assert [m["offset"] for m in everything["messages"]] == [1, 2, 3]
        newest = await call("history", "chat:lobby", limit=1, reverse=True)
        assert [m["data"] for m in newest["messages"]] == ["both"]
        after = await call("history", "chat:lobby", since={"offset": 1,
                                                            "epoch": joined["epoch"]})
        assert [m["offset"] for m in after["messages"]] == [2, 3] and after["recovered"]
        assert (await call("history", "chat:lobby", since=everything))["messages"] == []

        members = await call("presence", "chat:lobby")
        assert members["count"] == 1
        assert [(m["user_id"], m["nick"]) for m in members["members"]] == [("alice", "al")]
        assert await call("presence_stats", "chat:lobby") == {"clients": 1, "users": 1}
        assert await call("rooms") == {"rooms": {"chat:lobby": 1}}
        assert await call("rooms", "news:*") == {"rooms": {}}
        info = await call("info")
        assert info["node_id"] == api_node.node_id
        assert info["nodes"][api_node.node_id]["connections"] == 1
        replies = await call("batch", [
            {"method": "presence_stats", "params": {"room": "chat:lobby"}},
            {"method": "publish", "params": {"room": "news:today", "data": 1}},
            {"method": "nope", "params": {}}])
        assert [sorted(r) for r in replies["replies"]] == [["result"], ["result"], ["error"]]
        assert replies["replies"][0]["result"] == {"clients": 1, "users": 1}

        assert await call("unsubscribe", "alice", "chat:lobby") == {}
        left = await alice.expect("left", room="chat:lobby")
        assert left["reason"] == "unsubscribed"
        assert await call("disconnect", "alice", 4500, "kicked") == {}
        assert await alice.closed() == 4500
        assert alice.ws.close_reason == "kicked"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_api_error_carries_status_code_and_message(api_node: NodeProcess,
                                                         kind: str) -> None:
    """A refusal raises ApiError with the HTTP status, the API's code and its message."""
    async with client_calls(kind, api_node.api) as call:
        with pytest.raises(ApiError) as caught:
            await call("publish", "nope:x", 1)
        assert (caught.value.status, caught.value.code, caught.value.message,
                caught.value.retry_after) == (404, "unknown_namespace", "no namespace 'nope'",
                                              None)
        assert str(caught.value) == "404 unknown_namespace: no namespace 'nope'"
        with pytest.raises(ApiError) as caught:
            await call("disconnect", "alice", 3000)
        assert (caught.value.status, caught.value.code) == (400, "bad_request")
        assert "that roomcast does not use itself" in caught.value.message
        with pytest.raises(ApiError) as caught:
            await call("call", "no_such_method")
        assert (caught.value.status, caught.value.code) == (404, "not_found")
    async with client_calls(kind, api_node.api, "wrong" * 8) as call:
        with pytest.raises(ApiError) as caught:
            await call("info")
        assert (caught.value.status, caught.value.code, caught.value.message) == (
            401, "unauthorized", "wrong API key")
    async with client_calls(kind, "http://127.0.0.1:1") as call:
        with pytest.raises(ApiError) as caught:
            await call("info")
        assert (caught.value.status, caught.value.code) == (0, "unreachable")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_rate_limited_is_429_with_retry_after_and_publish_retries_it(
        start_node: Callable[..., NodeProcess], kind: str) -> None:
    """Past --api-rate a key gets 429 rate_limited with Retry-After; publish(retries=) waits
    that long and publishes once."""
    node = start_node(None, "--api-key", f"{KEY},{OTHER_KEY}", "--api-rate", "1")
    async with client_calls(kind, node.api) as call:
        with pytest.raises(ApiError) as caught:
            for _ in range(3):  # A bucket of two requests.
                await call("info")
        assert (caught.value.status, caught.value.code, caught.value.retry_after) == (
            429, "rate_limited", 1.0)
        assert (await call("publish", "r", "x", retries=3))["offset"] == 1
    assert history_offsets(node, "r") == [1]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_publish_twice_with_one_key_publishes_once(api_node: NodeProcess,
                                                         kind: str) -> None:
    """Two publishes with the same idempotency key: one message; the second says duplicate."""
    async with client_calls(kind, api_node.api) as call:
        one = await call("publish", "chat:orders", {"id": 7}, "order-7", retries=2)
        two = await call("publish", "chat:orders", {"id": 7}, "order-7", retries=2)
    assert "duplicate" not in one and two == {**one, "duplicate": True}
    assert history_offsets(api_node, "chat:orders") == [1]


class FlakyProxy:
    """A loopback HTTP proxy to a node that spoils its first ``spoil`` connections: ``"lose"``
    forwards the request and drops the connection when the reply starts (done, but the caller
    cannot know), ``"refuse"`` answers 503 itself without forwarding anything."""

    def __init__(self, upstream: int, mode: str, spoil: int = 1) -> None:
        self.upstream, self.mode, self.spoil = upstream, mode, spoil
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FlakyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        if self._handlers:  # The clients have closed their connections: the pumps end.
            _, pending = await asyncio.wait(self._handlers, timeout=5)
            for task in pending:
                task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        spoiled = self.connections <= self.spoil
        if spoiled and self.mode == "refuse":
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            # Read the body too: closing with unread bytes would reset the connection.
            await reader.readexactly(int(length.group(1)) if length else 0)
            body = b'{"error":{"code":"unavailable","message":"proxy says no"}}'
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\n"
                         b"Content-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, lose: bool) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if lose:
                        writer.transport.abort()  # The reply is lost on its way back.
                        break
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False),
                             pump(up_reader, writer, spoiled and self.mode == "lose"))


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("mode", ["lose", "refuse"])
async def test_publish_retries_under_one_generated_key_publish_once(
        api_node: NodeProcess, kind: str, mode: str) -> None:
    """publish(retries=N) without a key: a reply lost after the publish was done, or a 503,
    is retried under one generated key, and the room gets the message once."""
    async with FlakyProxy(api_node.api_port, mode) as proxy, client_calls(kind,
                                                                          proxy.url) as call:
        reply = await call("publish", "chat:retry", {"n": 1}, retries=2)
        assert proxy.connections >= 2
    if mode == "lose":  # The first attempt was published: the retry is its duplicate.
        assert reply == {"offset": 1, "epoch": reply["epoch"], "duplicate": True}
    else:
        assert reply == {"offset": 1, "epoch": reply["epoch"]}
    assert history_offsets(api_node, "chat:retry") == [1]
    async with FlakyProxy(api_node.api_port, mode) as proxy, client_calls(kind,
                                                                          proxy.url) as call:
        with pytest.raises(ApiError) as caught:  # Without retries the failure is the caller's.
            await call("publish", "chat:retry", {"n": 2})
    assert caught.value.status == (0 if mode == "lose" else 503)
    assert history_offsets(api_node, "chat:retry") == ([1, 2] if mode == "lose" else [1])


def api_503s(node: NodeProcess) -> float:
    with urllib.request.urlopen(f"{node.api}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.search(r'^roomcast_api_requests_total\{method="publish",status="503"\} (\S+)$',
                      text, flags=re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.redis
async def test_publish_retries_503_until_redis_is_back(
        redis_server: RedisServer, start_node: Callable[..., NodeProcess]) -> None:
    """Redis down: publish is 503 unavailable with Retry-After 1; publish(retries=) keeps
    trying and publishes once when Redis is back."""
    node = start_node(redis_server.url, "--api-key", KEY)
    api = ApiClient(node.api, KEY, timeout=5)
    redis_server.kill()
    with pytest.raises(ApiError) as caught:
        api.publish("room", 0)
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (
        503, "unavailable", 1.0)
    result: list[dict[str, Any]] = []
    retrier = threading.Thread(target=lambda: result.append(api.publish("room", 1, retries=8)),
                               daemon=True)
    retrier.start()
    await wait_for(lambda: api_503s(node) >= 2, what="the retrying publish's first 503")
    redis_server.start()
    await wait_for(lambda: not retrier.is_alive(), timeout=20, what="the retries")
    assert result and result[0]["offset"] == 1
    assert [m["data"] for m in api.history("room")["messages"]] == [1]


# --- roomcast api ------------------------------------------------------------------------------


def roomcast_api(node: NodeProcess | None, *args: str, key: str | None = KEY,
                 ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_API_")}
    if key is not None:
        env["ROOMCAST_API_KEY"] = key
    url = ["--url", node.api] if node is not None else []
    return subprocess.run([sys.executable, "-m", "roomcast", "api", *url, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=30, check=False)


def test_roomcast_api_prints_each_reply_as_json(api_node: NodeProcess) -> None:
    """Every subcommand prints the reply as one JSON line and exits 0."""
    expected: list[tuple[list[str], Callable[[Any], bool]]] = [
        (["publish", "--room", "chat:cli", "--text", "hi"], lambda r: r["offset"] == 1),
        (["publish", "--room", "chat:cli", "--data", '{"n": 2}', "--idempotency-key", "k2"],
         lambda r: r["offset"] == 2),
        (["publish", "--room", "chat:cli", "--data", '{"n": 2}', "--idempotency-key", "k2",
          "--retries", "2"], lambda r: r["offset"] == 2 and r["duplicate"] is True),
        (["broadcast", "--room", "chat:cli", "--room", "news:cli", "--text", "all"],
         lambda r: [x["offset"] for x in r["results"]] == [3, 1]),
        (["history", "--room", "chat:cli", "--limit", "2", "--reverse"],
         lambda r: [m["data"] for m in r["messages"]] == ["all", {"n": 2}]),
        (["history", "--room", "chat:cli", "--since-offset", "2", "--since-epoch", "x"],
         lambda r: r["recovered"] is False and r["messages"] == []),
        (["presence", "--room", "chat:cli"], lambda r: r == {"members": [], "count": 0}),
        (["presence-stats", "--room", "chat:cli"], lambda r: r == {"clients": 0, "users": 0}),
        (["rooms", "--pattern", "chat:*"], lambda r: r == {"rooms": {}}),
        (["info"], lambda r: r["node_id"] == api_node.node_id),
        (["disconnect", "--user", "bob", "--code", "4100", "--reason", "bye"],
         lambda r: r == {}),
        (["unsubscribe", "--user", "bob", "--room", "chat:cli"], lambda r: r == {}),
        (["batch", "--commands", '[{"method": "info", "params": {}}]'],
         lambda r: r["replies"][0]["result"]["node_id"] == api_node.node_id),
    ]
    for args, check in expected:
        done = roomcast_api(api_node, *args)
        assert (done.returncode, done.stderr) == (0, ""), args
        assert len(done.stdout.splitlines()) == 1, args
        assert check(orjson.loads(done.stdout)), (args, done.stdout)


def test_roomcast_api_error_is_one_line_and_exit_1(api_node: NodeProcess) -> None:
    """A refusal prints 'roomcast api: <status> <code>: <message>' on stderr and exits 1."""
    done = roomcast_api(api_node, "publish", "--room", "nope:x", "--text", "hi")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "roomcast api: 404 unknown_namespace: no namespace 'nope'\n"
    done = roomcast_api(api_node, "info", key="wrong")
    assert (done.returncode, done.stderr) == (1, "roomcast api: 401 unauthorized: wrong API key\n")
    done = subprocess.run([sys.executable, "-m", "roomcast", "api", "--url", "http://127.0.0.1:1",
                           "--key", KEY, "info"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("roomcast api: unreachable: http://127.0.0.1:1: ")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["publish", "--room", "chat:x"],                       # no --data or --text
    ["publish", "--room", "chat:x", "--data", "{bad"],     # not JSON
    ["history", "--room", "chat:x", "--since-offset", "1"],  # no --since-epoch
    ["history", "--room", "chat:x", "--limit", "0"],
    ["frobnicate"],
    [],
])
def test_roomcast_api_usage_error_exits_2(api_node: NodeProcess, args: list[str]) -> None:
    """Bad usage exits 2 with argparse's message and calls nothing."""
    done = roomcast_api(api_node, *args)
    assert (done.returncode, done.stdout) == (2, "")
    assert "error:" in done.stderr


def test_roomcast_api_without_a_key_exits_2() -> None:
    """No --key and no $ROOMCAST_API_KEY is a usage error."""
    done = roomcast_api(None, "info", key=None)
    assert (done.returncode, done.stdout) == (2, "")
    assert "an API key is needed: --key or $ROOMCAST_API_KEY" in done.stderr


def test_every_roomcast_api_flag_has_help() -> None:
    """`roomcast api` and each of its methods explain every option in --help."""
    from roomcast.cli import build_parser

    commands = next(a for a in build_parser(only="api")._actions if a.dest == "command").choices
    assert commands is not None
    api = commands["api"]
    methods = next(a for a in api._actions if a.dest == "method").choices
    assert methods is not None and set(methods) == {
        "publish", "broadcast", "presence", "presence-stats", "history", "disconnect",
        "unsubscribe", "rooms", "info", "batch"}
    for parser in (api, *methods.values()):
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}"
