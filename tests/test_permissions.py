"""Room namespaces and permissions on real nodes: join, publish, presence and history rules,
token grants and room tokens, and each namespace option, end to end over WebSocket."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from tests.harness import Client, NodeProcess, RedisServer, barrier, native

SECRET = "permissions-test-secret-0123456789-abcdef"

NAMESPACES = """\
[namespaces.chat]
join = "authenticated"

[namespaces.open]
join = "anyone"

[namespaces.ann]
publish = "granted"

[namespaces.vip]
join = "granted"

[namespaces.dash]
publish = "server"

[namespaces.quiet]
presence = false

[namespaces.nojl]
join_leave = false

[namespaces.norec]
recovery = false

[namespaces.small]
max_members = 2

[namespaces.short]
history_size = 3

[namespaces.live]
history_size = 0
"""

StartNode = Callable[..., NodeProcess]


def token(sub: str, **claims: Any) -> str:
    """A connection token (or, with a ``room`` claim, a room token) signed with SECRET."""
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600, **claims}, SECRET,
                      algorithm="HS256")


async def user(node: NodeProcess, sub: str, **claims: Any) -> Client:
    """A native client of ``sub`` (token in the URL) that has read its welcome."""
    client = await Client.open(node.ws(f"/ws?token={token(sub, **claims)}"))
    welcome = await client.expect("welcome")
    assert welcome["user_id"] == sub, welcome
    return client


def jwt_flags(tmp_path: Path) -> tuple[str, ...]:
    path = tmp_path / "namespaces.toml"
    path.write_text(NAMESPACES)
    return ("--auth", "jwt", "--jwt-secret", SECRET, "--namespaces-file", str(path),
            "--allow-anonymous", "true", "--presence-grace", "0.3", "--rate-burst", "500")


@pytest.fixture(params=["memory", "redis"])
def jnode(request: pytest.FixtureRequest, start_node: StartNode, tmp_path: Path) -> NodeProcess:
    """One node with --auth jwt and the NAMESPACES file: embedded, or on a redis-server."""
    redis_url = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_server").url
    return start_node(redis_url, *jwt_flags(tmp_path))


async def join(client: Client, room: str, rid: Any = "j", **extra: Any) -> dict[str, Any]:
    return await client.request({"type": "join", "room": room, "id": rid, **extra})


async def publish(client: Client, room: str, data: Any, rid: Any = "p") -> dict[str, Any]:
    return await client.request({"type": "publish", "room": room, "data": data, "id": rid})


def forbidden(reply: dict[str, Any], rid: Any) -> None:
    assert reply["type"] == "error", reply
    assert reply["code"] == "forbidden" and reply["id"] == rid, reply
    assert set(reply) == {"type", "code", "message", "id"}, reply


def http_get(url: str) -> tuple[int, bytes]:
    """(status, body) of a GET (blocking: call it in a thread)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def of_room(client: Client, room: str) -> list[dict[str, Any]]:
    """Everything the client received that names ``room``, but error replies."""
    return [m for m in client.seen if m.get("room") == room and m["type"] != "error"]


# --- namespaces ---------------------------------------------------------------------------


async def test_unknown_namespace_is_refused_with_the_request_id(jnode: NodeProcess) -> None:
    """With a namespaces file, a room whose prefix names no namespace: unknown_namespace."""
    alice = await user(jnode, "alice")
    for request in ({"type": "join", "room": "zzz:x", "id": 7},
                    {"type": "publish", "room": "zzz:x", "data": 1, "id": 8},
                    {"type": "history", "room": "zzz:x", "id": 9}):
        reply = await alice.request(request)
        assert reply["type"] == "error" and reply["code"] == "unknown_namespace", reply
        assert reply["id"] == request["id"]
    assert (await join(alice, "chat:x", 10))["type"] == "joined"


async def test_without_namespaces_file_prefixed_rooms_are_default(node: NodeProcess) -> None:
    """No namespaces file: a room with ':' is in the default namespace and works as before."""
    alice, bob = await native(node, "alice"), await native(node, "bob")
    for client in (alice, bob):
        assert (await join(client, "a:b"))["type"] == "joined"
    ack = await publish(alice, "a:b", "hello")
    assert ack["type"] == "published" and ack["room"] == "a:b"
    message = await bob.expect("message")
    assert message["data"] == "hello" and message["room"] == "a:b"
    assert (await join(alice, "zzz:x", 2))["type"] == "joined"


# --- forbidden actions leak nothing -------------------------------------------------------


async def test_forbidden_join_leaks_nothing_of_the_room(jnode: NodeProcess) -> None:
    """A refused join gets forbidden with its id; later messages of the room never reach it."""
    vip = await user(jnode, "vip", rooms={"vip:*": ["join"]})
    alice = await user(jnode, "alice")
    assert (await join(vip, "vip:gold"))["type"] == "joined"
    assert (await join(vip, "chat:lobby"))["type"] == "joined"
    forbidden(await join(alice, "vip:gold", "no"), "no")
    assert (await join(alice, "chat:lobby"))["type"] == "joined"

    ack = await publish(vip, "vip:gold", "secret")
    assert ack["type"] == "published"
    assert (await vip.expect("message", room="vip:gold"))["data"] == "secret"
    await barrier(vip, "chat:lobby", alice)  # Published after the secret, reached alice first.
    assert of_room(alice, "vip:gold") == []
    forbidden(await alice.request({"type": "presence", "room": "vip:gold", "id": "pr"}), "pr")
    forbidden(await alice.request({"type": "history", "room": "vip:gold", "id": "h"}), "h")


async def test_forbidden_publish_reaches_no_member(jnode: NodeProcess) -> None:
    """A publish where the client may not join is forbidden, and neither delivered nor stored."""
    vip = await user(jnode, "vip", rooms={"vip:*": ["join"]})
    alice = await user(jnode, "alice")
    assert (await join(vip, "vip:gold"))["type"] == "joined"
    forbidden(await publish(alice, "vip:gold", "intrusion", "x"), "x")
    ack = await barrier(vip, "vip:gold", vip)  # vip's next message is its own marker.
    history = await vip.request({"type": "history", "room": "vip:gold", "id": "h"})
    assert [m["offset"] for m in history["messages"]] == [ack["offset"]]
    assert all(m["data"] != "intrusion" for m in vip.seen if m["type"] == "message")
    assert of_room(alice, "vip:gold") == []


async def test_forbidden_presence_returns_no_members(jnode: NodeProcess) -> None:
    """A presence request where the client may not join is forbidden and lists nobody."""
    vip = await user(jnode, "vip", rooms={"vip:*": ["join"]})
    alice = await user(jnode, "alice")
    watcher = await user(jnode, "watcher", rooms={"vip:gold": ["presence"]})
    assert (await join(vip, "vip:gold"))["type"] == "joined"
    forbidden(await alice.request({"type": "presence", "room": "vip:gold", "id": 3}), 3)
    # A grant of presence alone shows it (the rule works), and does not admit a join.
    shown = await watcher.request({"type": "presence", "room": "vip:gold", "id": 4})
    assert shown["type"] == "presence" and shown["count"] == 1, shown
    assert [m["user_id"] for m in shown["members"]] == ["vip"]
    forbidden(await join(watcher, "vip:gold", 5), 5)
    assert of_room(alice, "vip:gold") == []
    # Nor does the client port's REST presence show it.
    status, body = await asyncio.to_thread(http_get, f"{jnode.http}/api/rooms/vip:gold/members")
    assert status == 403 and b"vip" not in body


async def test_forbidden_history_returns_no_messages(jnode: NodeProcess) -> None:
    """A history request where the client may not join is forbidden and returns no message."""
    vip = await user(jnode, "vip", rooms={"vip:*": ["join"]})
    alice = await user(jnode, "alice")
    reader = await user(jnode, "reader", rooms={"vip:gold": ["history"]})
    assert (await join(vip, "vip:gold"))["type"] == "joined"
    assert (await publish(vip, "vip:gold", "stored"))["type"] == "published"
    forbidden(await alice.request({"type": "history", "room": "vip:gold", "id": 11}), 11)
    forbidden(await alice.request({"type": "history", "room": "vip:gold", "id": 12,
                                   "since": {"offset": 0, "epoch": "x"}}), 12)
    # A grant of history alone reads it (the message is there to leak).
    shown = await reader.request({"type": "history", "room": "vip:gold", "id": 13})
    assert shown["type"] == "history" and [m["data"] for m in shown["messages"]] == ["stored"]
    assert of_room(alice, "vip:gold") == []


@pytest.mark.parametrize(("room", "reason"), [("vip:gold", "forbidden"),
                                            ("zzz:x", "unknown_namespace")])
async def test_chat_dialect_refused_from_its_room_gets_notice_and_1008(
    jnode: NodeProcess, room: str, reason: str,
) -> None:
    """A FastAPI-dialect client whose room it may not join: an error notice, then 1008, and
    nothing of the room (no member list, no join event)."""
    vip = await user(jnode, "vip", rooms={"vip:*": ["join"]})
    assert (await join(vip, "vip:gold"))["type"] == "joined"
    client = await Client.open(jnode.ws(f"/ws/chat/{room}?token={token('alice')}"))
    messages = await client.until_closed()
    assert [m["type"] for m in messages] == ["error"], messages
    assert set(messages[0]) == {"type", "message"}
    assert client.ws.close_code == 1008 and client.ws.close_reason == reason
    await barrier(vip, "vip:gold", vip)
    assert [m for m in vip.seen if m["type"] == "user_joined"] == []


async def test_anonymous_joins_only_where_anyone_may(jnode: NodeProcess) -> None:
    """join = "authenticated" refuses an anonymous connection (--allow-anonymous), which may
    join, publish and read only where join = "anyone"."""
    anon = await Client.open(jnode.ws("/ws"))
    await anon.send({"type": "connect", "id": "c"})
    assert (await anon.expect("welcome"))["anonymous"] is True
    forbidden(await join(anon, "chat:lobby", 1), 1)
    forbidden(await publish(anon, "chat:lobby", "hi", 2), 2)
    forbidden(await anon.request({"type": "history", "room": "chat:lobby", "id": 3}), 3)
    assert (await join(anon, "open:lobby", 4))["type"] == "joined"
    assert (await publish(anon, "open:lobby", "hi", 5))["type"] == "published"
    alice = await user(jnode, "alice")
    assert (await join(alice, "chat:lobby"))["type"] == "joined"


async def test_publish_granted_needs_a_publish_grant(jnode: NodeProcess) -> None:
    """publish = "granted": members without a publish grant are forbidden; a rooms claim or a
    room token with publish may; a room token limited to join may not."""
    plain = await user(jnode, "plain")
    claimed = await user(jnode, "claimed", rooms={"ann:*": ["publish"]})
    joiner = await user(jnode, "joiner")
    for client in (plain, claimed):
        assert (await join(client, "ann:news"))["type"] == "joined"
    only_join = token("joiner", room="ann:news", actions=["join"])
    assert (await join(joiner, "ann:news", token=only_join))["type"] == "joined"
    forbidden(await publish(plain, "ann:news", "no", 1), 1)
    forbidden(await publish(joiner, "ann:news", "no", 2), 2)
    assert (await publish(claimed, "ann:news", "yes", 3))["type"] == "published"
    editor = await user(jnode, "editor")
    assert (await join(editor, "ann:news", token=token("editor", room="ann:news")))[
        "type"] == "joined"
    assert (await publish(editor, "ann:news", "also", 4))["type"] == "published"
    history = await plain.request({"type": "history", "room": "ann:news", "id": "h"})
    assert [m["data"] for m in history["messages"]] == ["yes", "also"]


# --- grants and room tokens ---------------------------------------------------------------


async def test_rooms_claim_grants_join(jnode: NodeProcess) -> None:
    """A rooms claim {"vip:*": ["join"]} admits vip:gold and every vip room; a grant of
    another action there admits no join."""
    granted = await user(jnode, "g", rooms={"vip:*": ["join"]})
    assert (await join(granted, "vip:gold"))["type"] == "joined"
    assert (await join(granted, "vip:silver", 2))["type"] == "joined"
    other = await user(jnode, "o", rooms={"vip:gold": ["history"]})
    forbidden(await join(other, "vip:gold", 3), 3)


async def test_room_token_admits_only_its_room_and_user(jnode: NodeProcess) -> None:
    """A room token for (sub, room) admits that user to that room; a token for another room,
    for another user, or a connection token in its place: unauthorized, and not joined."""
    bob = await user(jnode, "bob")
    refusals = [
        (token("bob", room="vip:silver"), "unauthorized", "room token is for another room"),
        (token("carol", room="vip:gold"), "unauthorized", "room token is for another user"),
        (token("bob", rooms={"vip:*": ["join"]}), "unauthorized", "not a room token"),
        (token("bob", room="vip:gold", exp=int(time.time()) - 60), "token_expired",
         "token expired"),
    ]
    for rid, (bad, code, message) in enumerate(refusals):
        reply = await join(bob, "vip:gold", rid, token=bad)
        assert (reply["type"], reply["code"], reply["id"]) == ("error", code, rid), reply
        assert reply["message"] == message
    forbidden(await publish(bob, "vip:gold", "not joined", "p0"), "p0")
    reply = await join(bob, "vip:gold", "ok", token=token("bob", room="vip:gold"))
    assert reply["type"] == "joined" and reply["id"] == "ok", reply
    ack = await publish(bob, "vip:gold", "in")
    assert ack["type"] == "published"
    assert (await bob.expect("message", room="vip:gold"))["data"] == "in"
    # The grant is for vip:gold alone, and a room token is no connection token.
    forbidden(await join(bob, "vip:silver", "s"), "s")
    with pytest.raises(InvalidStatus) as refused:
        await Client.open(jnode.ws(f"/ws?token={token('bob', room='vip:gold')}"))
    assert refused.value.response.status_code == 401


async def test_server_only_namespace_refuses_client_publish(jnode: NodeProcess) -> None:
    """publish = "server": members join, but no client publishes, not even with a grant."""
    plain = await user(jnode, "plain")
    granted = await user(jnode, "granted", rooms={"dash:*": ["join", "publish"]})
    for client in (plain, granted):
        assert (await join(client, "dash:ops"))["type"] == "joined"
        forbidden(await publish(client, "dash:ops", "status", "p1"), "p1")
        await client.send({"type": "typing", "room": "dash:ops"})
    history = await plain.request({"type": "history", "room": "dash:ops", "id": "h"})
    assert history["type"] == "history" and history["messages"] == [], history
    assert (await join(plain, "chat:ops"))["type"] == "joined"
    assert (await join(granted, "chat:ops"))["type"] == "joined"
    await barrier(granted, "chat:ops", plain)
    assert [m for m in plain.seen if m["type"] == "typing"] == []


# --- namespace options --------------------------------------------------------------------


async def test_presence_off_writes_nothing_to_redis(
    start_node: StartNode, redis_server: RedisServer, redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    """presence = false: joining writes no presence entry to Redis; presence is forbidden."""
    node = start_node(redis_server.url, *jwt_flags(tmp_path))
    alice = await user(node, "alice")
    assert (await join(alice, "quiet:room"))["type"] == "joined"
    assert (await join(alice, "chat:room"))["type"] == "joined"
    keys = [k.decode() for k in await redis_client.keys("*")]
    presence_keys = [k for k in keys if "pres:" in k or "users:" in k]
    assert any("chat:room" in k for k in presence_keys), keys  # The check can see them.
    assert [k for k in presence_keys if "quiet:room" in k] == [], keys
    forbidden(await alice.request({"type": "presence", "room": "quiet:room", "id": 1}), 1)
    watcher = await user(node, "watcher", rooms={"quiet:*": ["presence", "join"]})
    forbidden(await watcher.request({"type": "presence", "room": "quiet:room", "id": 3}), 3)
    nick = await join(alice, "quiet:other", "n", nick="al")
    assert (nick["type"], nick["code"], nick["id"]) == ("error", "bad_request", "n"), nick
    shown = await alice.request({"type": "presence", "room": "chat:room", "id": 2})
    assert shown["type"] == "presence" and shown["count"] == 1


async def test_join_leave_off_sends_no_presence_events(jnode: NodeProcess) -> None:
    """join_leave = false: members see no user_joined / user_left for that room."""
    alice = await user(jnode, "alice")
    for room in ("nojl:r", "chat:r"):
        assert (await join(alice, room))["type"] == "joined"
    bob = await user(jnode, "bob")
    # nojl:r first: its events, were there any, would be sent before chat:r's.
    for room in ("nojl:r", "chat:r"):
        assert (await join(bob, room))["type"] == "joined"
    assert (await alice.expect("user_joined", room="chat:r"))["user_id"] == "bob"
    await bob.close()
    assert (await alice.expect("user_left", room="chat:r"))["user_id"] == "bob"
    await barrier(alice, "nojl:r", alice)
    events = [m for m in alice.seen if m["type"] in ("user_joined", "user_left")]
    assert [(m["type"], m["room"]) for m in events] == [("user_joined", "chat:r"),
                                                        ("user_left", "chat:r")]


async def test_join_leave_off_holds_after_a_presence_repair(
    start_node: StartNode, redis_server: RedisServer, redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    """join_leave = false: when Redis loses presence and each node writes its users back (and
    announces them again, user_joined), nothing is announced in that namespace either."""
    flags = (*jwt_flags(tmp_path), "--node-lease-ttl", "2")
    a, b = start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)
    alice, bob = await user(a, "alice"), await user(b, "bob")
    for client in (alice, bob):
        for room in ("nojl:r", "chat:r"):  # nojl:r first: written back, announced, first.
            assert (await join(client, room))["type"] == "joined"
    assert (await alice.expect("user_joined", room="chat:r"))["user_id"] == "bob"
    await redis_client.flushall()  # Redis lost its data (a restart without persistence).
    # The repair did run: bob is announced again where join/leave events are on.
    back = await alice.expect("user_joined", room="chat:r", timeout=15)
    assert back["user_id"] == "bob"
    await barrier(bob, "nojl:r", alice)
    assert [m for m in alice.seen if m["type"] in ("user_joined", "user_left")
            and m["room"] == "nojl:r"] == []


async def test_recovery_off_replays_nothing(jnode: NodeProcess) -> None:
    """recovery = false: a join with since answers recovered false and replays nothing."""
    alice = await user(jnode, "alice")
    acks = {}
    for room in ("norec:r", "chat:r"):
        assert (await join(alice, room))["type"] == "joined"
        acks[room] = [await publish(alice, room, n, n) for n in range(3)]
    bob = await user(jnode, "bob")
    first = acks["chat:r"][0]
    replayed = await join(bob, "chat:r", since={"offset": first["offset"],
                                                "epoch": first["epoch"]})
    assert replayed["type"] == "joined" and replayed["recovered"] is True, replayed
    assert [(await bob.expect("message", room="chat:r"))["data"] for _ in range(2)] == [1, 2]

    first = acks["norec:r"][0]
    reply = await join(bob, "norec:r", "n", since={"offset": first["offset"],
                                                   "epoch": first["epoch"]})
    assert reply["type"] == "joined" and reply["recovered"] is False, reply
    await barrier(alice, "norec:r", bob)
    assert [m for m in bob.seen if m["type"] == "message" and m["room"] == "norec:r"
            and m["data"] in (0, 1, 2)] == []


async def test_namespace_history_size_limits_stored_messages(jnode: NodeProcess) -> None:
    """history_size = 3: only the last three messages are kept (chat keeps all five)."""
    alice = await user(jnode, "alice")
    for room in ("short:r", "chat:r"):
        assert (await join(alice, room))["type"] == "joined"
        for n in range(5):
            assert (await publish(alice, room, n, n))["type"] == "published"
    short = await alice.request({"type": "history", "room": "short:r", "id": "h1"})
    assert [m["data"] for m in short["messages"]] == [2, 3, 4], short
    full = await alice.request({"type": "history", "room": "chat:r", "id": "h2"})
    assert [m["data"] for m in full["messages"]] == [0, 1, 2, 3, 4], full


async def test_namespace_history_size_zero_stores_nothing(jnode: NodeProcess) -> None:
    """history_size = 0: messages are delivered live but none is stored or replayed."""
    alice, bob = await user(jnode, "alice"), await user(jnode, "bob")
    for client in (alice, bob):
        assert (await join(client, "live:r"))["type"] == "joined"
    acks = [await publish(alice, "live:r", n, n) for n in range(3)]
    assert [a["type"] for a in acks] == ["published"] * 3
    assert [(await bob.expect("message"))["data"] for _ in range(3)] == [0, 1, 2]
    history = await bob.request({"type": "history", "room": "live:r", "id": "h"})
    assert history["type"] == "history" and history["messages"] == [], history
    carol = await user(jnode, "carol")
    reply = await join(carol, "live:r", since={"offset": acks[0]["offset"],
                                               "epoch": acks[0]["epoch"]})
    assert reply["type"] == "joined" and reply["recovered"] is False, reply
    await barrier(alice, "live:r", carol)


async def test_max_members_refuses_a_third_user_not_a_second_tab(jnode: NodeProcess) -> None:
    """max_members = 2: a third distinct user gets room_full; another tab of a member gets in."""
    alice, bob, carol = [await user(jnode, name) for name in ("alice", "bob", "carol")]
    tab = await user(jnode, "alice")
    assert (await join(alice, "small:r"))["type"] == "joined"
    assert (await join(bob, "small:r"))["type"] == "joined"
    full = await join(carol, "small:r", "c")
    assert full["type"] == "error" and full["code"] == "room_full" and full["id"] == "c", full
    assert (await join(tab, "small:r"))["type"] == "joined"
    shown = await alice.request({"type": "presence", "room": "small:r", "id": "pr"})
    assert shown["count"] == 2 and len(shown["members"]) == 3, shown
    await barrier(alice, "small:r", bob, tab)
    assert of_room(carol, "small:r") == []
    await bob.close()  # Gone after --presence-grace: a place is free again.
    assert (await alice.expect("user_left", room="small:r"))["user_id"] == "bob"
    assert (await join(carol, "small:r", "again"))["type"] == "joined"


async def test_from_is_the_verified_identity(jnode: NodeProcess) -> None:
    """A message's from is the token's identity, whatever from the client puts in its publish."""
    alice = await user(jnode, "alice", name="Alice")
    bob = await user(jnode, "bob")
    for client in (alice, bob):
        assert (await join(client, "chat:r"))["type"] == "joined"
    forged = {"user_id": "admin", "username": "Administrator"}
    data = {"from": forged, "text": "hi"}
    ack = await alice.request({"type": "publish", "room": "chat:r", "data": data,
                               "from": forged, "id": "f"})
    assert ack["type"] == "published", ack
    message = await bob.expect("message")
    assert message["from"] == {"user_id": "alice", "username": "Alice"}, message
    assert message["data"] == data
    history = await bob.request({"type": "history", "room": "chat:r", "id": "h"})
    assert [m["from"] for m in history["messages"]] == [{"user_id": "alice",
                                                        "username": "Alice"}]


async def test_chat_dialect_identity_is_the_token_not_the_query(jnode: NodeProcess) -> None:
    """A FastAPI-dialect client naming user_id/username in its URL speaks as its token's user."""
    bob = await user(jnode, "bob")
    assert (await join(bob, "chat:r"))["type"] == "joined"
    url = jnode.ws(f"/ws/chat/chat:r?user_id=admin&username=Admin&token={token('alice')}")
    alice = await Client.open(url)
    assert (await alice.expect("user_joined"))["user_id"] == "alice"
    await alice.send({"type": "message", "content": "hi", "user_id": "admin"})
    message = await bob.expect("message")
    assert message["from"] == {"user_id": "alice", "username": "alice"}, message
    assert message["data"] == "hi"
