"""Redis key and channel names: one prefix, one hash tag per room, no collisions."""

from __future__ import annotations

import hashlib
import inspect
import re
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.backends.keys import Keys, partition, shard

FUZZ = settings(database=None, deadline=None, max_examples=200)
room_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-",
    min_size=1,
    max_size=64,
)
node_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=30)
prefixes = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_:-", min_size=1, max_size=20)
#: User ids are printable and may hold spaces (and braces: their key is touched alone).
user_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyzAB0123456789 _.:@-", min_size=1,
                   max_size=40)
#: Idempotency keys are any client string up to 128 characters, braces and spaces included.
idempotency_keys = st.text(min_size=1, max_size=128)


def room_keys(keys: Keys, room: str, node_id: str = "n1", key: str = "k") -> list[str]:
    """Every name of one room (the room's slot)."""
    return [
        keys.channel(room), keys.meta(room), keys.stream(room), keys.presence(room, node_id),
        keys.presence_nodes(room), keys.nicks(room), keys.users(room), keys.leaves(room),
        keys.leave_names(room), keys.idempotency(room, key),
    ]


def node_keys(keys: Keys, node_id: str = "n1") -> list[str]:
    """Every node-level and cluster-wide name (each its own slot)."""
    return [
        keys.control(), keys.nodes(), keys.node_info(node_id), keys.node_rooms(node_id),
        keys.leave_rooms(), keys.probe(node_id),
    ]


def user_keys(keys: Keys, user_id: str = "u1") -> list[str]:
    """Every per-user name (the user's slot, each touched alone)."""
    return [keys.user_connections(user_id)]


def test_default_names_match_the_documented_layout() -> None:
    """The default prefix is roomcast and room names sit in a {hash tag}."""
    keys = Keys()
    assert room_keys(keys, "lobby") == [
        "roomcast:ch:{lobby}", "roomcast:meta:{lobby}", "roomcast:hist:{lobby}",
        "roomcast:pres:{lobby}:n1", "roomcast:presnodes:{lobby}", "roomcast:nicks:{lobby}",
        "roomcast:users:{lobby}", "roomcast:leaves:{lobby}", "roomcast:leavenames:{lobby}",
        "roomcast:idem:{lobby}:" + hashlib.sha256(b"k").hexdigest(),
    ]
    assert node_keys(keys) == [
        "roomcast:control", "roomcast:nodes", "roomcast:node:n1", "roomcast:noderooms:n1",
        "roomcast:leaverooms", "roomcast:probe:n1",
    ]
    assert user_keys(keys, "ann") == ["roomcast:uconns:{ann}"]


def test_every_name_method_is_covered_here() -> None:
    """The lists above name every method of Keys that builds a name, so each new name is held
    to the tag and collision rules below."""
    keys = Keys("p")
    builders = {
        name for name, _ in inspect.getmembers(Keys, inspect.isfunction)
        if not name.startswith("_") and name not in ("room_of_channel", "partition_channel")
    }
    built = set(room_keys(keys, "r", "n")) | set(node_keys(keys, "n")) | set(user_keys(keys, "u"))
    for name in builders:
        method = getattr(keys, name)
        params = list(inspect.signature(method).parameters)
        values = {"room": "r", "node_id": "n", "user_id": "u", "key": "k"}
        assert method(*(values[p] for p in params)) in built, name


@FUZZ
@given(prefix=prefixes, room=room_names, node_id=node_ids)
def test_every_room_key_has_the_prefix_and_the_room_as_its_only_hash_tag(
    prefix: str, room: str, node_id: str
) -> None:
    """A room's keys all start with the prefix and share one Redis Cluster hash tag: the room."""
    for key in room_keys(Keys(prefix), room, node_id):
        assert key.startswith(prefix + ":")
        assert re.findall(r"\{([^}]*)\}", key) == [room]
        # The tag is the first {...} of the key: nothing before it may open a brace.
        assert key.index("{") == key.index("{" + room + "}")


@FUZZ
@given(prefix=prefixes, room=room_names, key=idempotency_keys, other=idempotency_keys)
def test_an_idempotency_key_keeps_the_room_as_the_only_hash_tag(
    prefix: str, room: str, key: str, other: str
) -> None:
    """Whatever a client's idempotency key holds (braces, spaces, 128 characters), its name
    carries the room as its only tag, is short, and differs from another key's."""
    name = Keys(prefix).idempotency(room, key)
    assert re.findall(r"\{([^}]*)\}", name) == [room]
    assert name.index("{") == name.index("{" + room + "}")
    assert len(name) == len(prefix) + len(room) + len(":idem:{}:") + 64
    if other != key:
        assert Keys(prefix).idempotency(room, other) != name


@FUZZ
@given(prefix=prefixes, node_id=node_ids)
def test_node_level_names_carry_no_hash_tag(prefix: str, node_id: str) -> None:
    """Node-level and cluster-wide names have the prefix and no {tag}: they never pose as a
    room's keys, and each hashes on its whole name."""
    for key in node_keys(Keys(prefix), node_id):
        assert key.startswith(prefix + ":")
        assert "{" not in key and "}" not in key


@FUZZ
@given(prefix=prefixes, user_id=user_ids)
def test_a_users_names_have_the_prefix_and_the_user_as_hash_tag(prefix: str, user_id: str) -> None:
    """A user's names start with the prefix and carry the user id as their hash tag (one key
    per script or command, so the tag only spreads users over the slots)."""
    for key in user_keys(Keys(prefix), user_id):
        assert key.startswith(prefix + ":")
        assert key.endswith("{" + user_id + "}")
        assert key.index("{") == len(key) - len(user_id) - 2


@FUZZ
@given(prefix=prefixes, room=room_names)
def test_room_of_channel_inverts_channel(prefix: str, room: str) -> None:
    """The room is read back from a channel name exactly."""
    keys = Keys(prefix)
    assert keys.room_of_channel(keys.channel(room)) == room


@FUZZ
@given(room=room_names, other=room_names, node_id=node_ids, user_id=user_ids,
       other_user=user_ids)
def test_names_of_different_rooms_and_concepts_never_collide(
    room: str, other: str, node_id: str, user_id: str, other_user: str
) -> None:
    """No two concepts, rooms or users share a key, so one's data never overwrites another's."""
    keys = Keys()
    names = room_keys(keys, room, node_id) + node_keys(keys, node_id) + user_keys(keys, user_id)
    if other != room:
        names += room_keys(keys, other, node_id)
    if other_user != user_id:
        names += user_keys(keys, other_user)
    assert len(names) == len(set(names))


def test_two_prefixes_share_no_names() -> None:
    """Two clusters on one Redis with different prefixes touch disjoint keys."""
    first = set(room_keys(Keys("a"), "r") + node_keys(Keys("a")) + user_keys(Keys("a")))
    second = set(room_keys(Keys("b"), "r") + node_keys(Keys("b")) + user_keys(Keys("b")))
    assert first.isdisjoint(second)


@FUZZ
@given(prefix=prefixes, room=room_names, other=room_names, node_id=node_ids,
       partitions=st.integers(min_value=1, max_value=1024))
def test_with_partitions_a_rooms_keys_share_its_partitions_tag_and_stay_its_own(
    prefix: str, room: str, other: str, node_id: str, partitions: int
) -> None:
    """--redis-cluster: every key of a room and its channel carry the room's partition as their
    one hash tag (one slot: its scripts may touch them all, SPUBLISH included), and no key of
    one room is another room's, even in the same partition (only the channel is shared)."""
    keys = Keys(prefix, partitions)
    tag = f"p{partition(room, partitions)}"
    names = room_keys(keys, room, node_id)
    for key in names:
        assert key.startswith(prefix + ":")
        assert re.findall(r"\{([^}]*)\}", key)[:1] == [tag]
        assert "{" not in key[: key.index("{" + tag)]
    assert keys.channel(room) == keys.partition_channel(partition(room, partitions))
    if other != room:
        theirs = set(room_keys(keys, other, node_id)[1:])
        assert theirs.isdisjoint(names[1:])


def test_partitions_are_stable_and_spread() -> None:
    """The partition of a room is the same in every process (CRC-32, not the salted hash) and
    10,000 rooms spread over 128 partitions within a factor of two of the mean."""
    assert partition("lobby", 128) == zlib.crc32(b"lobby") % 128
    counts = [0] * 128
    for i in range(10_000):
        counts[partition(f"room-{i}", 128)] += 1
    mean = 10_000 / 128
    assert mean / 2 < min(counts) and max(counts) < mean * 2


def test_jump_hash_spreads_rooms_and_moves_few_when_a_shard_is_added() -> None:
    """Client-side sharding: 10,000 rooms over 4 shards are spread within 15% of the mean, and
    adding a fifth moves only rooms to the new shard, about a fifth of them."""
    rooms = [f"room-{i}" for i in range(10_000)]
    four = [shard(room, 4) for room in rooms]
    counts = [four.count(i) for i in range(4)]
    assert max(counts) < 2500 * 1.15 and min(counts) > 2500 * 0.85
    five = [shard(room, 5) for room in rooms]
    moved = [(a, b) for a, b in zip(four, five, strict=True) if a != b]
    assert all(b == 4 for _, b in moved)
    assert 0.15 < len(moved) / len(rooms) < 0.25
    assert all(shard(room, 1) == 0 for room in rooms[:100])
