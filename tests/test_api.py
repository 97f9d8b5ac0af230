"""The server API on the internal port (transports/api.py, service/server.py): real nodes on a
real redis-server, called over HTTP as a backend would."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import Client, NodeProcess, RedisServer, barrier, native, wait_for

StartNode = Callable[..., NodeProcess]

#: Keys of 32+ characters, as a deployment would use.
KEY = "api-key-0123456789abcdef0123456789abcdef"
KEY2 = "api-key-fedcba9876543210fedcba9876543210"
SERVER = {"user_id": "", "username": "server"}
NAMESPACES = '[namespaces.open]\njoin = "anyone"\n'
FAST = ("--presence-grace", "0.3", "--rate-burst", "500")


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


async def call(node: NodeProcess, method: str, params: Any = None, *, key: str | None = KEY,
               raw: bytes | None = None, headers: dict[str, str] | None = None,
               verb: str = "POST", path: str | None = None) -> Reply:
    """One HTTP request to ``node``'s internal port (``/api/<method>`` unless ``path``); the
    key as ``Authorization: apikey``; ``raw`` replaces the JSON body."""
    sent = dict(headers or {})
    if key is not None:
        sent.setdefault("Authorization", f"apikey {key}")
    data = raw if raw is not None else (None if params is None else json.dumps(params).encode())
    url = node.api + (path if path is not None else f"/api/{method}")
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
                session.request(verb, url, data=data, headers=sent) as response):
        text = await response.read()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text.decode(errors="replace")
        return Reply(response.status, body, dict(response.headers))


async def ok(node: NodeProcess, method: str, params: Any = None) -> Any:
    reply = await call(node, method, params if params is not None else {})
    assert reply.status == 200, reply
    return reply.body


def error(reply: Reply, status: int, code: str, mentions: str | None = None) -> None:
    """``reply`` is the JSON error ``code`` with HTTP ``status`` (naming ``mentions``)."""
    assert reply.status == status, reply
    assert reply.body["error"]["code"] == code, reply
    if mentions is not None:
        assert mentions in reply.body["error"]["message"], reply


async def joined(client: Client, room: str, **extra: Any) -> dict[str, Any]:
    reply = await client.request({"type": "join", "room": room, "id": f"j-{room}", **extra})
    assert reply["type"] == "joined", reply
    return reply


@pytest.fixture
def pair(start_node: StartNode, redis_server: RedisServer,
         tmp_path: Path) -> tuple[NodeProcess, NodeProcess]:
    """Two nodes on one redis-server with the API key and a namespaces file (rooms without a
    prefix and ``open:*``)."""
    spaces = tmp_path / "namespaces.toml"
    spaces.write_text(NAMESPACES)
    flags = ("--api-key", KEY, "--namespaces-file", str(spaces), *FAST)
    return start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)


# --- publish ---------------------------------------------------------------------------------


async def test_publish_reaches_members_on_both_nodes(
        pair: tuple[NodeProcess, NodeProcess]) -> None:
    """A publish through the API reaches the room's members on every node, from the server,
    with consecutive offsets that the API returned."""
    a, b = pair
    alice, bob = await native(a, "alice"), await native(b, "bob")
    start = (await joined(alice, "news"))["offset"]
    await joined(bob, "news")
    first = await ok(a, "publish", {"room": "news", "data": {"n": 1}})
    second = await ok(b, "publish", {"room": "news", "data": {"n": 2}})
    assert first["offset"] == start + 1 and second["offset"] == start + 2, (first, second)
    assert first["epoch"] == second["epoch"] and "duplicate" not in first
    for client in (alice, bob):
        got = [await client.expect("message") for _ in range(2)]
        assert [m["data"] for m in got] == [{"n": 1}, {"n": 2}]
        assert [m["offset"] for m in got] == [first["offset"], second["offset"]]
        assert all(m["from"] == SERVER and m["epoch"] == first["epoch"] for m in got), got


async def test_api_publication_is_recovered_after_a_reconnect(
        pair: tuple[NodeProcess, NodeProcess]) -> None:
    """A member whose socket died rejoins with 'since' and is replayed what the API published
    meanwhile, as any other message."""
    a, b = pair
    bob = await native(b, "bob")
    position = await joined(bob, "feed")
    bob.ws.transport.abort()  # The network dies under the client.
    missed = await ok(a, "publish", {"room": "feed", "data": "while away"})
    bob = await native(b, "bob")
    rejoined = await joined(bob, "feed", since={"offset": position["offset"],
                                                "epoch": position["epoch"]})
    assert rejoined["recovered"] is True and rejoined["offset"] == missed["offset"], rejoined
    replayed = await bob.expect("message")
    assert replayed["data"] == "while away" and replayed["from"] == SERVER
    assert replayed["offset"] == missed["offset"]


async def test_idempotent_retry_publishes_once(pair: tuple[NodeProcess, NodeProcess]) -> None:
    """The same idempotency_key twice returns the first offset and epoch with duplicate:true
    and publishes once; another key publishes."""
    a, b = pair
    alice, bob = await native(a, "alice"), await native(b, "bob")
    await joined(alice, "orders")
    await joined(bob, "orders")
    params = {"room": "orders", "data": {"order": 7}, "idempotency_key": "order-7"}
    first = await ok(a, "publish", params)
    retry = await ok(b, "publish", params)  # The retry may land on another node.
    assert "duplicate" not in first
    assert retry == {"offset": first["offset"], "epoch": first["epoch"], "duplicate": True}
    for client in (alice, bob):
        assert (await client.expect("message"))["data"] == {"order": 7}
    marker = await barrier(alice, "orders", alice, bob)  # Nothing else arrived.
    history = await ok(a, "history", {"room": "orders"})
    assert [m["data"] for m in history["messages"]].count({"order": 7}) == 1, history
    other = await ok(a, "publish", {**params, "idempotency_key": "order-8"})
    assert other["offset"] == marker["offset"] + 1 and "duplicate" not in other
    for client in (alice, bob):
        assert (await client.expect("message"))["offset"] == other["offset"]


async def test_broadcast_answers_each_room(pair: tuple[NodeProcess, NodeProcess]) -> None:
    """broadcast publishes to each room and answers one result per room, in order; an invalid
    room gets its own error entry and does not stop the others."""
    a, b = pair
    alice = await native(b, "alice")
    rooms = ["b1", "b2", "open:b3"]
    for room in rooms:
        await joined(alice, room)
    reply = await ok(a, "broadcast", {"rooms": [rooms[0], "bad room!", *rooms[1:]],
                                      "data": "all"})
    results = reply["results"]
    assert [r["room"] for r in results] == [rooms[0], "bad room!", *rooms[1:]], results
    assert results[1]["error"]["code"] == "bad_request" and "offset" not in results[1]
    valid = [results[0], *results[2:]]
    assert all(r["offset"] == 1 and "error" not in r for r in valid), results
    got = [await alice.expect("message") for _ in rooms]
    assert sorted(m["room"] for m in got) == sorted(rooms), got
    assert all(m["data"] == "all" and m["from"] == SERVER for m in got), got


# --- reads -----------------------------------------------------------------------------------


async def test_presence_and_presence_stats(pair: tuple[NodeProcess, NodeProcess]) -> None:
    """presence lists the members of both nodes and presence_stats counts clients and users;
    a missing room is 400 naming the field, an unknown namespace 404."""
    a, b = pair
    alice1, alice2, bob = await native(a, "alice"), await native(b, "alice"), await native(b,
                                                                                          "bob")
    for client in (alice1, alice2, bob):
        await joined(client, "open:lobby")
    presence = await ok(a, "presence", {"room": "open:lobby"})
    assert presence["count"] == 2 and len(presence["members"]) == 3, presence
    assert {m["user_id"] for m in presence["members"]} == {"alice", "bob"}
    assert {m["node_id"] for m in presence["members"]} == {a.node_id, b.node_id}
    assert await ok(b, "presence_stats", {"room": "open:lobby"}) == {"clients": 3, "users": 2}
    assert await ok(a, "presence_stats", {"room": "open:empty"}) == {"clients": 0, "users": 0}
    for method in ("presence", "presence_stats"):
        error(await call(a, method, {}), 400, "bad_request", "'room'")
        error(await call(a, method, {"room": "nope:x"}), 404, "unknown_namespace", "nope")


async def test_history_since_limit_reverse(pair: tuple[NodeProcess, NodeProcess]) -> None:
    """history returns stored messages oldest first; since, limit and reverse narrow and order
    them; a bad limit or reverse is 400 naming it, an unknown namespace 404."""
    a, b = pair
    offsets = [(await ok(a, "publish", {"room": "open:h", "data": i}))["offset"]
               for i in range(5)]
    assert offsets == [1, 2, 3, 4, 5]
    every = await ok(b, "history", {"room": "open:h"})
    assert [m["data"] for m in every["messages"]] == [0, 1, 2, 3, 4]
    assert every["offset"] == 5 and "recovered" not in every
    assert all(m["from"] == SERVER for m in every["messages"])
    epoch = every["epoch"]
    newest = await ok(b, "history", {"room": "open:h", "limit": 2})
    assert [m["offset"] for m in newest["messages"]] == [4, 5]
    since = await ok(b, "history", {"room": "open:h", "since": {"offset": 2, "epoch": epoch}})
    assert [m["offset"] for m in since["messages"]] == [3, 4, 5] and since["recovered"] is True
    page = await ok(b, "history", {"room": "open:h", "since": {"offset": 2, "epoch": epoch},
                                   "limit": 1})
    assert [m["offset"] for m in page["messages"]] == [3]
    backwards = await ok(b, "history", {"room": "open:h", "reverse": True})
    assert [m["offset"] for m in backwards["messages"]] == [5, 4, 3, 2, 1]
    lost = await ok(b, "history", {"room": "open:h", "since": {"offset": 2, "epoch": "other"}})
    assert lost["recovered"] is False and lost["messages"] == []
    error(await call(a, "history", {"room": "open:h", "limit": "x"}), 400, "bad_request",
          "limit")
    error(await call(a, "history", {"room": "open:h", "reverse": "yes"}), 400, "bad_request",
          "reverse")
    error(await call(a, "history", {"room": "nope:h"}), 404, "unknown_namespace")


async def test_rooms_and_info(pair: tuple[NodeProcess, NodeProcess]) -> None:
    """rooms lists active rooms cluster-wide with their users, filtered by a glob pattern;
    info lists both nodes with their connections; a non-string pattern is 400."""
    a, b = pair
    alice, bob, carol = await native(a, "alice"), await native(b, "bob"), await native(b, "carol")
    for client, room in ((alice, "open:x"), (bob, "open:x"), (carol, "open:y"),
                         (carol, "plain")):
        await joined(client, room)
    assert await ok(a, "rooms") == {"rooms": {"open:x": 2, "open:y": 1, "plain": 1}}
    assert await ok(b, "rooms", {"pattern": "open:*"}) == {"rooms": {"open:x": 2, "open:y": 1}}
    assert await ok(b, "rooms", {"pattern": "none:*"}) == {"rooms": {}}
    error(await call(a, "rooms", {"pattern": 5}), 400, "bad_request", "pattern")
    info = await ok(a, "info")
    assert info["node_id"] == a.node_id and info["rooms"] == 3, info
    assert set(info["nodes"]) == {a.node_id, b.node_id}, info

    async def counted() -> bool:
        # Each node writes its connection count when it renews its lease (a few seconds).
        nodes = (await ok(b, "info"))["nodes"]
        return [nodes[n.node_id]["connections"] for n in (a, b)] == [1, 2]

    await wait_for(counted, timeout=8, interval=0.2, what="the nodes' connection counts")


# --- cluster-wide actions ---------------------------------------------------------------------


async def test_disconnect_closes_the_user_on_every_node(
        pair: tuple[NodeProcess, NodeProcess]) -> None:
    """disconnect closes every connection of the user on every node, with 4500 by default or
    the code and reason asked; other users stay connected."""
    a, b = pair
    alice_a, alice_b = await native(a, "alice"), await native(b, "alice")
    await joined(alice_a, "hall")
    await joined(alice_b, "hall")
    for code, params in ((4500, {}), (4321, {"code": 4321, "reason": "banned"})):
        mallory = [await native(a, "mallory"), await native(b, "mallory")]
        assert await ok(a, "disconnect", {"user": "mallory", **params}) == {}
        for client in mallory:
            assert await client.closed() == code
            assert client.ws.close_reason == params.get("reason", "disconnected")
        await barrier(alice_a, "hall", alice_a, alice_b)  # The others still get through.
    error(await call(a, "disconnect", {"user": "alice", "code": 1011}), 400, "bad_request",
          "code")
    error(await call(a, "disconnect", {}), 400, "bad_request", "'user'")
    await barrier(alice_b, "hall", alice_a, alice_b)  # A refused disconnect closed no one.


async def test_unsubscribe_takes_the_user_out_of_the_room(
        pair: tuple[NodeProcess, NodeProcess]) -> None:
    """unsubscribe tells the user's native connection left/unsubscribed and it gets no more
    messages of that room, while it stays in its other rooms."""
    a, b = pair
    alice, mallory = await native(a, "alice"), await native(b, "mallory")
    for client in (alice, mallory):
        await joined(client, "u")
        await joined(client, "v")
    assert await ok(a, "unsubscribe", {"user": "mallory", "room": "u"}) == {}
    assert await mallory.expect("left", room="u") == {"type": "left", "room": "u",
                                                      "reason": "unsubscribed"}
    await ok(a, "publish", {"room": "u", "data": "after"})
    assert (await alice.expect("message"))["data"] == "after"  # Alice is still in u.
    await barrier(alice, "v", mallory)  # The u message never reached mallory.
    error(await call(a, "unsubscribe", {"user": "mallory"}), 400, "bad_request", "'room'")


# --- auth ------------------------------------------------------------------------------------


async def test_no_key_configured_means_the_api_is_off(start_node: StartNode) -> None:
    """Without --api-key the API answers 404 to every call, whatever key is sent."""
    node = start_node(None, *FAST)
    error(await call(node, "publish", {"room": "r", "data": 1}), 404, "not_found")
    error(await call(node, "info", {}, key=None), 404, "not_found")


async def test_missing_or_wrong_key_is_401_and_two_keys_both_work(
        start_node: StartNode) -> None:
    """A missing or wrong key is 401; with --api-key k1,k2 either key works, in either
    header."""
    node = start_node(None, "--api-key", f"{KEY},{KEY2}", *FAST)
    error(await call(node, "info", {}, key=None), 401, "unauthorized")
    error(await call(node, "info", {}, key=KEY[:-1] + "x"), 401, "unauthorized")
    error(await call(node, "info", {}, key=None, headers={"X-API-Key": "wrong"}), 401,
          "unauthorized")
    error(await call(node, "info", {}, key=None, headers={"Authorization": f"Bearer {KEY}"}),
          401, "unauthorized")
    for key in (KEY, KEY2):
        assert (await call(node, "info", {}, key=key)).status == 200
        assert (await call(node, "info", {}, key=None, headers={"X-API-Key": key})).status == 200


async def test_key_file_is_reread_when_a_key_is_added(start_node: StartNode,
                                                      tmp_path: Path) -> None:
    """A key appended to --api-key-file is accepted within a few seconds, the old one still
    is; a key not in the file never is."""
    keys = tmp_path / "api-keys"
    keys.write_text(KEY + "\n")
    node = start_node(None, "--api-key-file", str(keys), *FAST)
    assert (await call(node, "info", {}, key=KEY)).status == 200
    error(await call(node, "info", {}, key=KEY2), 401, "unauthorized")
    with keys.open("a") as file:
        file.write(KEY2 + "\n")

    async def accepted() -> bool:
        return (await call(node, "info", {}, key=KEY2)).status == 200

    await wait_for(accepted, timeout=4, interval=0.2, what="the appended key")
    assert (await call(node, "info", {}, key=KEY)).status == 200
    error(await call(node, "info", {}, key="api-key-never-in-the-file-0123456789"), 401,
          "unauthorized")


# --- bad input and limits --------------------------------------------------------------------


async def test_bad_requests_get_their_status(start_node: StartNode) -> None:
    """Malformed JSON and a non-object body are 400, a body over --api-max-body 413, an
    unknown method 404, GET on a method 405, a batch over --api-max-batch 400."""
    node = start_node(None, "--api-key", KEY, "--api-max-body", "2048", "--api-max-batch", "3",
                      *FAST)
    error(await call(node, "publish", raw=b'{"room": "r", "data":'), 400, "bad_request", "JSON")
    error(await call(node, "publish", raw=b'[{"room": "r", "data": 1}]'), 400, "bad_request",
          "object")
    big = json.dumps({"room": "r", "data": "x" * 3000}).encode()
    error(await call(node, "publish", raw=big), 413, "payload_too_large")
    error(await call(node, "nosuch", {}), 404, "not_found")
    error(await call(node, "publish", verb="GET"), 405, "method_not_allowed")
    error(await call(node, "publish", {"data": 1}), 400, "bad_request", "'room'")
    command = {"method": "publish", "params": {"room": "r", "data": 1}}
    error(await call(node, "batch", {"commands": [command] * 4}), 400, "bad_request", "3")
    batch = await ok(node, "batch", {"commands": [command, {"method": "nosuch", "params": {}},
                                                  command]})
    replies = batch["replies"]
    assert [r.get("result", {}).get("offset") for r in replies] == [1, None, 2], batch
    assert replies[1]["error"]["code"] == "bad_request"
    # Nothing refused above was published: the batch's two are the room's only messages.
    assert (await ok(node, "history", {"room": "r"}))["offset"] == 2


async def test_rate_limit_is_429_with_retry_after(start_node: StartNode) -> None:
    """Past --api-rate (a bucket of twice the rate) a key gets 429 with Retry-After."""
    node = start_node(None, "--api-key", KEY, "--api-rate", "1", *FAST)
    statuses = []
    for _ in range(3):
        reply = await call(node, "info", {})
        statuses.append(reply.status)
    assert statuses == [200, 200, 429], statuses
    error(reply, 429, "rate_limited")
    assert int(reply.headers["Retry-After"]) >= 1, reply.headers


async def test_each_command_of_a_batch_costs_a_request(start_node: StartNode) -> None:
    """A batch of 3 commands needs 3 requests of --api-rate: with a bucket of 2 it is 429 and
    nothing of it is done."""
    node = start_node(None, "--api-key", KEY, "--api-rate", "1", *FAST)
    commands = [{"method": "publish", "params": {"room": "r", "data": n}} for n in range(3)]
    reply = await call(node, "batch", {"commands": commands})
    error(reply, 429, "rate_limited")


async def test_server_data_and_disconnect_codes_are_bounded(start_node: StartNode) -> None:
    """A publish larger than --max-message-size is 400 (clients could not take it), and a
    disconnect may not send a code roomcast uses for something else (4002, 4501)."""
    node = start_node(None, "--api-key", KEY, "--max-message-size", "1024", *FAST)
    error(await call(node, "publish", {"room": "r", "data": "x" * 2000}), 400, "bad_request",
          "--max-message-size")
    for code in (4002, 4501, 1001):
        error(await call(node, "disconnect", {"user": "u", "code": code}), 400, "bad_request",
              "does not use itself")
    assert (await call(node, "disconnect", {"user": "u", "code": 4600})).status == 200


async def test_publish_with_redis_down_is_503_never_200(start_node: StartNode,
                                                        redis_server: RedisServer) -> None:
    """With Redis gone a publish is answered 503 with Retry-After, never as a success."""
    node = start_node(redis_server.url, "--api-key", KEY, "--api-timeout", "3", *FAST)
    assert (await ok(node, "publish", {"room": "r", "data": "before"}))["offset"] == 1
    redis_server.kill()
    for i in range(3):
        reply = await call(node, "publish", {"room": "r", "data": i, "idempotency_key": f"k{i}"})
        error(reply, 503, "unavailable")
        assert int(reply.headers["Retry-After"]) >= 1, reply.headers


# --- plain routes ----------------------------------------------------------------------------


async def test_livez_readyz_drain_and_metrics(start_node: StartNode) -> None:
    """/livez and /readyz are 200; POST /admin/drain with the admin token turns readiness to
    503 draining (a wrong token is 401 and does not); /metrics counts API requests."""
    token = "admin-token-0123456789abcdef0123456789"
    node = start_node(None, "--api-key", KEY, "--admin-token", token, "--drain-delay", "30",
                      *FAST)
    assert (await ok(node, "info"))["node_id"] == node.node_id
    live = await call(node, "", verb="GET", path="/livez", key=None)
    assert live.status == 200 and live.body == {"status": "ok", "node_id": node.node_id}
    ready = await call(node, "", verb="GET", path="/readyz", key=None)
    assert ready.status == 200 and ready.body == {"status": "ready"}
    refused = await call(node, "", path="/admin/drain", key=None,
                         headers={"Authorization": "Bearer wrong"})
    error(refused, 401, "unauthorized")
    assert (await call(node, "", verb="GET", path="/readyz", key=None)).status == 200
    drain = await call(node, "", path="/admin/drain", key=None,
                       headers={"Authorization": f"Bearer {token}"})
    assert drain.status == 202 and drain.body["status"] == "draining", drain
    draining = await call(node, "", verb="GET", path="/readyz", key=None)
    assert draining.status == 503 and draining.body == {"status": "draining"}
    metrics = await call(node, "", verb="GET", path="/metrics", key=None)
    assert metrics.status == 200
    assert 'roomcast_api_requests_total{method="info",status="200"} 1.0' in metrics.body
