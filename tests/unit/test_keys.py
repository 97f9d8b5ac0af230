"""Redis key and channel names: one prefix, one hash tag per room, no collisions."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.backends.keys import Keys

FUZZ = settings(database=None, deadline=None, max_examples=200)
room_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-",
    min_size=1,
    max_size=64,
)
prefixes = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_:-", min_size=1, max_size=20)


def room_keys(keys: Keys, room: str) -> list[str]:
    return [
        keys.channel(room), keys.meta(room), keys.stream(room), keys.presence(room, "n1"),
        keys.presence_nodes(room), keys.nicks(room), keys.users(room),
    ]


def node_keys(keys: Keys) -> list[str]:
    return [
        keys.nodes(), keys.node_info("n1"), keys.node_rooms("n1"), keys.rooms(),
        keys.leave_names(), keys.leaves(),
    ]


def test_default_names_match_the_documented_layout() -> None:
    """The default prefix is roomcast and room names sit in a {hash tag}."""
    keys = Keys()
    assert room_keys(keys, "lobby") == [
        "roomcast:ch:{lobby}", "roomcast:meta:{lobby}", "roomcast:hist:{lobby}",
        "roomcast:pres:{lobby}:n1", "roomcast:presnodes:{lobby}", "roomcast:nicks:{lobby}",
        "roomcast:users:{lobby}",
    ]
    assert node_keys(keys) == [
        "roomcast:nodes", "roomcast:node:n1", "roomcast:noderooms:n1", "roomcast:rooms",
        "roomcast:leavenames", "roomcast:leaves",
    ]


@FUZZ
@given(prefix=prefixes, room=room_names)
def test_every_room_key_has_the_prefix_and_the_room_as_its_only_hash_tag(
    prefix: str, room: str
) -> None:
    """A room's keys all start with the prefix and share one Redis Cluster hash tag: the room."""
    for key in room_keys(Keys(prefix), room):
        assert key.startswith(prefix + ":")
        assert re.findall(r"\{([^}]*)\}", key) == [room]


@FUZZ
@given(prefix=prefixes, room=room_names)
def test_room_of_channel_inverts_channel(prefix: str, room: str) -> None:
    """The room is read back from a channel name exactly."""
    keys = Keys(prefix)
    assert keys.room_of_channel(keys.channel(room)) == room


@FUZZ
@given(room=room_names, other=room_names)
def test_names_of_different_rooms_and_concepts_never_collide(room: str, other: str) -> None:
    """No two concepts or rooms share a key, so one room's data never overwrites another's."""
    keys = Keys()
    names = room_keys(keys, room) + node_keys(keys)
    if other != room:
        names += room_keys(keys, other)
    assert len(names) == len(set(names))


def test_two_prefixes_share_no_names() -> None:
    """Two clusters on one Redis with different prefixes touch disjoint keys."""
    first = set(room_keys(Keys("a"), "r") + node_keys(Keys("a")))
    second = set(room_keys(Keys("b"), "r") + node_keys(Keys("b")))
    assert first.isdisjoint(second)
