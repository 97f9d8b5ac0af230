"""Clients written for the two chat tutorials work against roomcast unchanged."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pytest

from tests.harness import Client, NodeProcess, RedisServer, native


def fastapi_url(node: NodeProcess, room: str, user_id: str, username: str) -> str:
    return node.ws(f"/ws/chat/{room}?user_id={user_id}&username={username}")


async def test_fastapi_tutorial_flow_with_two_clients(node: NodeProcess) -> None:
    """Join, member list, messages (JSON and plain text), typing, ping and leave, as the
    FastAPI tutorial's clients expect them."""
    alice = await Client.open(fastapi_url(node, "lobby", "u1", "Alice"))
    joined = await alice.recv()
    assert joined["type"] == "user_joined" and joined["user_id"] == "u1"
    assert joined["username"] == "Alice" and joined["room_id"] == "lobby"
    assert "Alice" in joined["message"]
    datetime.fromisoformat(joined["timestamp"])
    assert await alice.recv() == {"type": "room_members", "members": ["u1"], "count": 1}

    bob = await Client.open(fastapi_url(node, "lobby", "u2", "Bob"))
    assert (await bob.recv())["type"] == "user_joined"
    members = await bob.recv()
    assert members["type"] == "room_members" and sorted(members["members"]) == ["u1", "u2"]
    assert members["count"] == 2
    bob_joined = await alice.expect("user_joined")
    assert bob_joined["user_id"] == "u2" and bob_joined["username"] == "Bob"

    await alice.send({"type": "message", "content": "hello"})
    await alice.send("plain text works too")
    for client in (alice, bob):
        first, second = await client.expect("message"), await client.expect("message")
        assert first["content"] == "hello" and second["content"] == "plain text works too"
        assert first["user_id"] == "u1" and first["username"] == "Alice"
        assert first["room_id"] == "lobby"
        datetime.fromisoformat(first["timestamp"])
        assert set(first) == {"type", "user_id", "username", "content", "timestamp", "room_id"}

    await bob.send({"type": "typing"})
    typing = await alice.expect("typing")
    assert typing == {"type": "typing", "user_id": "u2", "username": "Bob", "room_id": "lobby"}
    await bob.send({"type": "ping"})
    assert await bob.expect("pong") == {"type": "pong"}
    # Barrier: bob's own next message in the room comes after his typing notice, had he got it.
    await bob.send({"type": "message", "content": "after typing"})
    for client in (alice, bob):
        assert (await client.expect("message"))["content"] == "after typing"
    assert not [m for m in bob.seen if m["type"] == "typing"]
    assert [m for m in alice.seen if m["type"] == "typing"] == [typing]

    await bob.close()
    left = await alice.expect("user_left", timeout=5)
    assert left["user_id"] == "u2" and left["username"] == "Bob" and "Bob" in left["message"]


async def test_fastapi_and_native_clients_share_rooms(node: NodeProcess) -> None:
    """A native client in a room sees FastAPI clients' messages and vice versa."""
    web = await Client.open(fastapi_url(node, "shared", "w", "Web"))
    nat = await native(node, "n", "Native")
    await nat.request({"type": "join", "room": "shared", "id": 1})
    await web.send({"type": "message", "content": "from web"})
    message = await nat.expect("message")
    assert message["data"] == "from web" and message["from"]["username"] == "Web"
    await nat.send({"type": "publish", "room": "shared", "data": "from native"})
    assert (await web.expect("message", content="from native"))["username"] == "Native"


async def test_fastapi_invalid_room_is_refused(node: NodeProcess) -> None:
    """A room id outside the allowed characters closes the socket with 1008."""
    client = await Client.open(node.ws("/ws/chat/bad%20room?user_id=u&username=U"))
    assert await client.closed() == 1008


async def test_tutorial_chat_on_root_path(node: NodeProcess) -> None:
    """The python-websockets tutorial's chat: join with a nick, chat, join/leave notices, info."""
    ann = await Client.open(node.ws("/"))
    await ann.send({"type": "join", "nick": "  ann  "})
    info = await ann.expect("info")
    assert info["nick"] == "server" and "1 present" in info["text"]
    ben = await Client.open(node.ws("/"))
    await ben.send({"type": "join", "nick": "ben"})
    assert "2 present" in (await ben.expect("info"))["text"]
    assert await ann.expect("join") == {"type": "join", "nick": "ben", "text": ""}

    await ann.send({"type": "chat", "nick": "ignored", "text": "hi ben"})
    for client in (ann, ben):
        assert await client.expect("chat") == {"type": "chat", "nick": "ann", "text": "hi ben"}
    await ben.send({"type": "chat", "nick": "ben", "text": "y" * 900})
    assert len((await ann.expect("chat", nick="ben"))["text"]) == 500

    await ben.close()
    assert await ann.expect("leave", timeout=5) == {"type": "leave", "nick": "ben", "text": ""}


async def test_tutorial_nick_is_cut_and_duplicates_refused(node: NodeProcess) -> None:
    """Nicks are cut to 20 characters; a nick in use gets an error and close 1008."""
    first = await Client.open(node.ws("/"))
    await first.send({"type": "join", "nick": "n" * 30})
    assert "n" * 20 in (await first.expect("info"))["text"]
    second = await Client.open(node.ws("/"))
    await second.send({"type": "join", "nick": "N" * 25})  # Same nick, other case, cut.
    error = await second.expect("error")
    assert error["nick"] == "server" and "taken" in error["text"]
    assert await second.closed() == 1008
    assert second.ws.close_reason == "nick taken"


@pytest.mark.parametrize("first", ['{"type": "chat", "text": "hi"}', "nonsense", '{"type":"join"}'])
async def test_tutorial_requires_join_first(node: NodeProcess, first: str) -> None:
    """Anything but a join with a nick as the first frame gets an error and close 1008."""
    client = await Client.open(node.ws("/"))
    await client.send(first)
    assert (await client.expect("error"))["nick"] == "server"
    assert await client.closed() == 1008


# --- nicks across a cluster ---------------------------------------------------------------


@pytest.fixture
def pair(redis_server: RedisServer, start_node: Callable[..., NodeProcess]) -> tuple[
        NodeProcess, NodeProcess]:
    """Two nodes with --auth none sharing one redis-server."""
    flags = ("--presence-grace", "0.3", "--rate-burst", "500")
    return start_node(redis_server.url, *flags), start_node(redis_server.url, *flags)


async def tutorial(node: NodeProcess, nick: str) -> Client:
    """A python-websockets tutorial client on '/' that has sent its join."""
    client = await Client.open(node.ws("/"))
    await client.send({"type": "join", "nick": nick})
    return client


async def assert_nick_refused(client: Client) -> None:
    messages = await client.until_closed()
    assert [(m["type"], m["nick"]) for m in messages] == [("error", "server")], messages
    assert "taken" in messages[0]["text"]
    assert client.ws.close_code == 1008 and client.ws.close_reason == "nick taken"


async def test_tutorial_nick_is_unique_across_nodes(pair: tuple[NodeProcess, NodeProcess]) -> None:
    """Two tutorial clients with the same nick, one per node: the second gets an error and
    1008; the first keeps its nick and chats on."""
    a, b = pair
    first = await tutorial(a, "dave")
    assert "1 present" in (await first.expect("info"))["text"]
    await assert_nick_refused(await tutorial(b, "Dave"))
    other = await tutorial(b, "erin")
    assert "2 present" in (await other.expect("info"))["text"]
    await first.send({"type": "chat", "text": "still here"})
    assert await other.expect("chat") == {"type": "chat", "nick": "dave", "text": "still here"}


async def test_native_client_cannot_take_a_tutorial_nick(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    """A native ?user_id=dave joining the tutorial room with nick dave, on either node, while a
    tutorial client holds dave: nick_taken, and not joined."""
    a, b = pair
    holder = await tutorial(a, "dave")
    await holder.expect("info")
    for node in (a, b):
        dave = await native(node, "dave")
        reply = await dave.request({"type": "join", "room": "chat", "nick": "dave", "id": 1})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "nick_taken", 1), reply
        left = await dave.request({"type": "leave", "room": "chat", "id": 2})
        assert (left["type"], left["code"]) == ("error", "not_joined"), left
    presence = await (await native(b, "watch")).request(
        {"type": "presence", "room": "chat", "id": 3})
    assert [(m["user_id"], m["nick"]) for m in presence["members"]] == [("dave", "dave")]
    assert presence["members"][0]["node_id"] == a.node_id


async def test_tutorial_client_cannot_take_a_native_nick(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    """A tutorial client asking for the nick a native client holds in the tutorial room (on
    the other node): an error and 1008; the native client keeps it."""
    a, b = pair
    dave = await native(a, "dave")
    reply = await dave.request({"type": "join", "room": "chat", "nick": "dave", "id": 1})
    assert reply["type"] == "joined", reply
    await assert_nick_refused(await tutorial(b, "DAVE"))
    presence = await dave.request({"type": "presence", "room": "chat", "id": 2})
    assert [(m["user_id"], m["nick"]) for m in presence["members"]] == [("dave", "dave")]


@pytest.mark.parametrize("nick", ["server", "Server", "SERVER", "  sErVeR  "])
async def test_tutorial_nick_server_is_reserved(
    pair: tuple[NodeProcess, NodeProcess], nick: str,
) -> None:
    """The nick "server" (any case), the tutorial's own sender name: an error and 1008."""
    await assert_nick_refused(await tutorial(pair[0], nick))
    client = await native(pair[1], "u")
    reply = await client.request({"type": "join", "room": "chat", "nick": nick, "id": 1})
    assert (reply["type"], reply["code"]) == ("error", "nick_taken"), reply
