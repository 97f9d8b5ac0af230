"""The PresenceStore contract of one node, asserted once for MemoryPresence and RedisPresence.

Each test uses one store (one node); what several nodes sharing one Redis see of each other is
in test_presence_cluster.py, except for the per-user connection count, whose cluster cases are
at the end of this file (Redis only). "No user_left" is proven with the recorder's settle
barrier: a sentinel user leaves after the decision in question, and its user_left is awaited
first.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import redis.asyncio as aioredis

from roomcast.backends.keys import Keys
from roomcast.backends.presence import Member
from roomcast.backends.presence_redis import USER_CONNS_TTL_MS
from tests.contract.factories import (
    GRACE,
    WAIT,
    Backend,
    LeftRecorder,
    RedisBackend,
    eventually_equal,
    member,
)
from tests.harness import RedisServer

#: A JSON value as a token's public info may be: nested, with every JSON type in it.
INFO = {"team": "red", "roles": ["admin", "mod"], "level": 3, "score": 1.5, "away": False,
        "avatar": None, "bio": "é ☃ \"quoted\" {braces}", "nested": {"deep": [{"x": []}]}}


def user(user_id: str) -> str:
    """claim_nick's owner of a connection with an identity."""
    return f"user:{user_id}"


def anonymous(conn_id: str) -> str:
    """claim_nick's owner of a connection without an identity."""
    return f"conn:{conn_id}"


async def test_add_is_true_only_for_a_users_first_connection(backend: Backend) -> None:
    """user_joined is due for a user's first connection in a room, not for a second tab nor
    for the same connection added again."""
    store, _ = await backend.presence()
    assert await store.add("r", member("u1", "c1")) is True
    assert await store.add("r", member("u1", "c2")) is False
    assert await store.add("r", member("u1", "c2")) is False
    assert await store.add("r", member("u2", "c3")) is True
    assert await store.add("other", member("u1", "c4")) is True


async def test_user_left_fires_once_after_the_grace_window(backend: Backend) -> None:
    """After a user's last connection is gone for the grace window, user_left fires exactly
    once, with the room and the username; a repeated remove schedules nothing more."""
    store, recorder = await backend.presence()
    first, second = member("u1", "c1"), member("u1", "c2")
    await store.add("r", first)
    await store.add("r", second)
    await store.remove("r", first)
    gone_at = time.monotonic()
    await store.remove("r", second)
    await store.remove("r", second)
    await recorder.settle(store)
    assert recorder.users_left() == [("r", "u1", "U1")]
    # A small allowance: the event loop may run a timer a clock tick early.
    assert recorder.times["u1"] - gone_at >= GRACE - 0.01
    assert await store.members("r") == []


async def test_reconnect_within_grace_causes_no_user_left_and_no_user_joined(
    backend: Backend,
) -> None:
    """A user who reconnects within the grace window neither leaves nor joins again."""
    store, recorder = await backend.presence()
    await store.add("r", member("u1", "c1"))
    await store.remove("r", member("u1", "c1"))
    assert await store.add("r", member("u1", "c2")) is False
    await recorder.settle(store)
    assert recorder.users_left() == []
    assert [m.conn_id for m in await store.members("r")] == ["c2"]


async def test_a_reconnect_then_a_final_leave_gives_exactly_one_user_left(
    backend: Backend,
) -> None:
    """A user who drops, reconnects in time and then leaves for good gets one user_left."""
    store, recorder = await backend.presence()
    await store.add("r", member("u1", "c1"))
    await store.remove("r", member("u1", "c1"))
    await store.add("r", member("u1", "c2"))
    await store.remove("r", member("u1", "c2"))
    await recorder.settle(store)
    assert recorder.users_left() == [("r", "u1", "U1")]


async def test_user_with_another_connection_left_does_not_leave(backend: Backend) -> None:
    """Closing one of two tabs does not make the user leave the room."""
    store, recorder = await backend.presence()
    await store.add("r", member("u1", "c1"))
    await store.add("r", member("u1", "c2"))
    await store.remove("r", member("u1", "c1"))
    await recorder.settle(store)
    assert recorder.users_left() == []
    assert [m.conn_id for m in await store.members("r")] == ["c2"]


async def test_a_closed_store_announces_no_user_left(backend: Backend) -> None:
    """After close, the store calls on_user_left no more: not for a leave that was pending, nor
    for the users still present at close (Redis leaves those to a surviving node)."""
    store, recorder = await backend.presence("n1")
    await store.add("r", member("u1", "c1"))
    await store.remove("r", member("u1", "c1"))
    await store.add("r", member("u2", "c2"))
    await store.close()
    await store.close()
    # Barrier: another node's user_left, scheduled after the close, comes after the grace
    # window of every decision the closed store had pending.
    other, other_recorder = await backend.presence("n2")
    await other_recorder.settle(other)
    assert recorder.calls == []


async def test_restore_of_a_present_user_changes_nothing(backend: Backend) -> None:
    """restore() of a user whose entries the store has writes nothing new: no second entry, no
    user_left; restoring a user or room it does not know is harmless."""
    store, recorder = await backend.presence()
    ann = member("u1", "c1")
    await store.add("r", ann)
    await store.restore("r", "u1")
    await store.restore("r", "nobody")
    await store.restore("elsewhere", "u1")
    assert await store.members("r") == [ann]
    assert await store.members("elsewhere") == []
    await recorder.settle(store)
    assert recorder.users_left() == []
    assert await store.add("r", member("u1", "c2")) is False  # Still counted once.


async def test_members_are_listed_oldest_first(backend: Backend) -> None:
    """members() lists every connection of the room by join time, each as it was added."""
    store, _ = await backend.presence()
    newest = member("u1", "c3", joined_at=3000)
    middle = member("u2", "c2", "Bob", joined_at=2000)
    oldest = member("u1", "c1", "Ann", joined_at=1000)
    for added in (middle, oldest, newest):
        await store.add("r", added)
    await store.add("other", member("u3", "c4"))
    assert await store.members("r") == [oldest, middle, newest]
    assert await store.members("empty") == []


async def test_stats_count_users_per_room_and_this_nodes_connections(backend: Backend) -> None:
    """stats() counts distinct users per room and reports the node's connection count (Redis:
    as of the node's next lease refresh, so within a bounded wait)."""
    store, _ = await backend.presence("n1")
    await store.add("r", member("u2", "c2"))
    await store.add("r", member("u1", "c1"))
    await store.add("r", member("u1", "c3"))
    await store.add("s", member("u3", "c4"))
    store.set_connection_count(3)
    await eventually_equal(store.stats, {
        "nodes": {"n1": {"connections": 3, "alive": True}}, "rooms": {"r": 2, "s": 1}
    })


def test_member_to_dict_omits_an_absent_nick_and_info() -> None:
    """A member without a nick or info is listed without those keys; with them, they are
    included (a falsy info too: only None means none)."""
    assert member("u1", "c1").to_dict() == {
        "user_id": "u1", "username": "U1", "node_id": "n1", "conn_id": "c1", "joined_at": 0
    }
    assert member("u1", "c1", "Ann").to_dict()["nick"] == "Ann"
    assert Member(**member("u1", "c1").to_dict()) == member("u1", "c1")
    with_info = dataclasses.replace(member("u1", "c1"), info=INFO)
    assert with_info.to_dict()["info"] == INFO
    assert Member(**with_info.to_dict()) == with_info
    assert dataclasses.replace(member("u1", "c1"), info=0).to_dict()["info"] == 0


async def test_member_info_round_trips_through_members(backend: Backend) -> None:
    """A member's info comes back from members() as it was added, whatever JSON it is."""
    store, _ = await backend.presence()
    added = [
        dataclasses.replace(member("u1", "c1", "Ann", joined_at=1), info=INFO),
        dataclasses.replace(member("u2", "c2", joined_at=2), info="just a string"),
        dataclasses.replace(member("u3", "c3", joined_at=3), info=[0, False, ""]),
        member("u4", "c4", joined_at=4),
    ]
    for each in added:
        await store.add("r", each)
    assert await store.members("r") == added


async def test_members_with_info_leave_and_are_announced_as_others(backend: Backend) -> None:
    """A member with info leaves, and is announced gone once, like any other (the stores decode
    the member they drop)."""
    store, recorder = await backend.presence()
    ann = dataclasses.replace(member("u1", "c1", "Ann"), info=INFO)
    assert await store.claim_nick("r", "Ann", ann, owner=user("u1"))
    await store.add("r", ann)
    await store.remove("r", ann)
    await recorder.settle(store)
    assert recorder.users_left() == [("r", "u1", "U1")]
    assert await store.claim_nick("r", "ann", member("u2", "c2", "ann"), owner=user("u2"))


async def test_count_is_the_rooms_distinct_users(backend: Backend) -> None:
    """count() is the number of distinct users in the room: a user's two connections count
    once, other rooms not at all, and a user whose last connection left no more."""
    store, _ = await backend.presence()
    assert await store.count("r") == 0
    await store.add("r", member("u1", "c1"))
    await store.add("r", member("u1", "c2"))
    await store.add("r", member("u2", "c3"))
    await store.add("s", member("u3", "c4"))
    assert await store.count("r") == 2
    await store.remove("r", member("u2", "c3"))
    assert await store.count("r") == 1
    await store.remove("r", member("u1", "c1"))
    assert await store.count("r") == 1
    assert await store.count("s") == 1
    assert await store.count("empty") == 0


async def test_open_connection_counts_up_to_the_limit_and_close_frees_a_slot(
    backend: Backend,
) -> None:
    """A user's connections are counted up to the limit, then refused (and not recorded);
    closing one lets another in; each user has a count of their own."""
    store, _ = await backend.presence()
    assert await store.open_connection("u1", "c1", 2) is True
    assert await store.open_connection("u1", "c2", 2) is True
    assert await store.open_connection("u1", "c3", 2) is False
    assert await store.open_connection("u1", "c3", 2) is False  # The refusal recorded nothing.
    assert await store.open_connection("u1", "c1", 2) is True  # Already counted: still is.
    assert await store.open_connection("u2", "c4", 1) is True
    assert await store.open_connection("u2", "c5", 1) is False
    await store.close_connection("u1", "c1")
    await store.close_connection("u1", "c1")  # Twice: harmless.
    await store.close_connection("nobody", "c9")
    assert await store.open_connection("u1", "c3", 2) is True
    assert await store.open_connection("u1", "c6", 2) is False
    assert await store.open_connection("u1", "c6", 3) is True  # The limit is the caller's.
    with pytest.raises(ValueError):
        await store.open_connection("u3", "c7", 0)


async def test_a_closed_store_counts_no_connections(backend: Backend) -> None:
    """Closing the store (a clean shutdown) stops counting the connections it opened."""
    store, _ = await backend.presence("n1")
    assert await store.open_connection("u1", "c1", 1)
    await store.close()
    other, _ = await backend.presence("n2")
    assert await other.open_connection("u1", "c2", 1)


async def test_nick_claims_conflict_across_connections_case_insensitively(
    backend: Backend,
) -> None:
    """A nick held by one user is refused to other users in any letter case, in that room only;
    the holder may claim it again."""
    store, _ = await backend.presence()
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice"), owner=user("u1"))
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice"), owner=user("u1"))
    assert not await store.claim_nick("r", "alice", member("u2", "c2", "alice"),
                                      owner=user("u2"))
    assert not await store.claim_nick("r", "ALICE", member("u3", "c3", "ALICE"),
                                      owner=user("u3"))
    assert await store.claim_nick("other", "alice", member("u2", "c2", "alice"),
                                  owner=user("u2"))


async def test_the_same_user_may_take_its_own_nick_over(backend: Backend) -> None:
    """A user's new connection (a reconnect) takes over the user's nick; others still may not.
    Without an owner, the member's user is the owner."""
    store, _ = await backend.presence()
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice"), owner=user("u1"))
    assert await store.claim_nick("r", "ALICE", member("u1", "c3", "ALICE"), owner=user("u1"))
    assert not await store.claim_nick("r", "alice", member("u3", "c4", "alice"),
                                      owner=user("u3"))
    assert await store.claim_nick("r", "Bob", member("u2", "c5", "Bob"))
    assert await store.claim_nick("r", "bob", member("u2", "c6", "bob"), owner=user("u2"))
    assert await store.claim_nick("r", "BOB", member("u2", "c7", "BOB"))
    assert not await store.claim_nick("r", "bob", member("u3", "c8", "bob"))


async def test_a_nick_owner_is_not_the_user_id(backend: Backend) -> None:
    """Only the owner decides a takeover: another owner is refused even with the same user id,
    and the same owner succeeds even with another user id."""
    store, _ = await backend.presence()
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice"), owner="team:a")
    assert not await store.claim_nick("r", "alice", member("u1", "c2", "alice"),
                                      owner=user("u1"))
    assert await store.claim_nick("r", "alice", member("u2", "c3", "alice"), owner="team:a")
    # An owner may hold spaces (a user id may): it is compared whole.
    assert await store.claim_nick("r", "Carl", member("u 4", "c4", "Carl"), owner=user("u 4"))
    assert not await store.claim_nick("r", "carl", member("u", "c5", "carl"), owner=user("u"))
    assert await store.claim_nick("r", "carl", member("u 4", "c6", "carl"), owner=user("u 4"))


async def test_anonymous_connections_never_take_each_others_nick(backend: Backend) -> None:
    """A connection without an identity (owner ``conn:<conn_id>``) keeps its nick against every
    other connection, anonymous or not, while it holds it; it may claim it again itself."""
    store, _ = await backend.presence()
    first = member("anon", "c1", "Guest")
    assert await store.claim_nick("r", "Guest", first, owner=anonymous("c1"))
    assert await store.claim_nick("r", "guest", first, owner=anonymous("c1"))
    assert not await store.claim_nick("r", "GUEST", member("anon", "c2", "GUEST"),
                                      owner=anonymous("c2"))
    assert not await store.claim_nick("r", "guest", member("anon", "c3", "guest"),
                                      owner=user("anon"))
    await store.add("r", first)
    await store.remove("r", first)
    assert await store.claim_nick("r", "guest", member("anon", "c2", "guest"),
                                  owner=anonymous("c2"))


async def test_nick_is_released_when_its_holder_leaves(backend: Backend) -> None:
    """Once the holder's connection leaves the room, another connection can take the nick."""
    store, _ = await backend.presence()
    holder = member("u1", "c1", "Alice")
    assert await store.claim_nick("r", "Alice", holder) is True
    await store.add("r", holder)
    await store.remove("r", holder)
    assert await store.claim_nick("r", "aLiCe", member("u2", "c2", "aLiCe")) is True


async def test_removing_a_refused_claimant_keeps_the_holders_nick(backend: Backend) -> None:
    """A connection that was refused a nick cannot release it for the holder by leaving."""
    store, _ = await backend.presence()
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice")) is True
    refused = member("u2", "c2", "alice")
    assert await store.claim_nick("r", "alice", refused) is False
    await store.add("r", refused)
    await store.remove("r", refused)
    assert await store.claim_nick("r", "ALICE", member("u3", "c3", "ALICE")) is False


async def test_a_taken_over_nick_is_not_released_by_the_old_connection(
    backend: Backend,
) -> None:
    """After a reconnect took the nick over, the old connection leaving keeps it held."""
    store, _ = await backend.presence()
    old, new = member("u1", "c1", "Alice"), member("u1", "c2", "Alice")
    assert await store.claim_nick("r", "Alice", old) is True
    await store.add("r", old)
    assert await store.claim_nick("r", "Alice", new) is True
    await store.add("r", new)
    await store.remove("r", old)
    assert await store.claim_nick("r", "alice", member("u2", "c3", "alice")) is False


# --- Redis only: connection counts across the nodes of one cluster -----------------------------


async def test_the_connection_limit_counts_every_nodes_connections(
    redis_backend: RedisBackend,
) -> None:
    """Two nodes sharing one Redis count a user's connections together: the limit is
    cluster-wide, and a close on either node frees a slot on both."""
    recorder = LeftRecorder()
    a, _ = await redis_backend.presence("n1", recorder)
    b, _ = await redis_backend.presence("n2", recorder)
    assert await a.open_connection("u1", "c1", 2)
    assert await b.open_connection("u1", "c2", 2)
    assert not await a.open_connection("u1", "c3", 2)
    assert not await b.open_connection("u1", "c4", 2)
    assert await b.open_connection("u2", "c5", 2)  # Another user: a count of their own.
    await a.close_connection("u1", "c1")
    assert await b.open_connection("u1", "c4", 2)
    assert not await a.open_connection("u1", "c3", 2)
    await b.close_connection("u1", "c2")
    assert await a.open_connection("u1", "c3", 2)


async def test_a_dead_nodes_connections_do_not_count(redis_backend: RedisBackend) -> None:
    """Connections counted by a node without a lease (dead, reaped) stop counting: another
    node's open lets the user in and drops them; a live node's still count."""
    keys = Keys(redis_backend.prefix)
    live, _ = await redis_backend.presence("n1")
    dead = redis_backend.leaseless_presence("n3")
    assert await dead.open_connection("u1", "c1", 1)
    assert await dead.open_connection("u1", "c2", 2)
    assert await live.open_connection("u1", "c3", 1)
    assert not await live.open_connection("u1", "c4", 1)
    admin = aioredis.Redis.from_url(redis_backend.url)
    try:
        assert await admin.hgetall(keys.user_connections("u1")) == {b"c3": b"n1"}
        assert 0 < await admin.pttl(keys.user_connections("u1")) <= USER_CONNS_TTL_MS
    finally:
        await admin.aclose()


async def test_a_node_that_finds_its_lease_gone_writes_its_connections_back(
    redis_backend: RedisBackend,
) -> None:
    """A live node whose lease and counts vanished (Redis lost them; or it was reaped and a
    user's open dropped its entries) writes its open connections back once it finds its lease
    gone, and they count again."""
    keys = Keys(redis_backend.prefix)
    a, _ = await redis_backend.presence("n1")
    b, _ = await redis_backend.presence("n2")
    assert await b.open_connection("u1", "c0", 2)
    assert await b.open_connection("u1", "c1", 2)
    await b.close_connection("u1", "c0")  # Closed: not written back.
    admin = aioredis.Redis.from_url(redis_backend.url)
    try:
        await admin.delete(keys.user_connections("u1"))
        await admin.zrem(keys.nodes(), "n2")
        await eventually_equal(lambda: admin.hgetall(keys.user_connections("u1")),
                               {b"c1": b"n2"})
        assert not await a.open_connection("u1", "c2", 1)
    finally:
        await admin.aclose()


async def test_a_close_that_redis_refuses_is_retried(redis_server: RedisServer) -> None:
    """close_connection does not fail when Redis refuses the write (an ACL denies HDEL here):
    the close is retried on a later tick, and the slot comes free then."""
    backend = RedisBackend(redis_server.url)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        store, _ = await backend.presence("n1")
        assert await store.open_connection("u1", "c1", 1)
        await admin.acl_setuser("default", enabled=True, commands=["-hdel"])
        try:
            await store.close_connection("u1", "c1")
            assert not await store.open_connection("u1", "c2", 1)
        finally:
            await admin.acl_setuser("default", enabled=True, commands=["+hdel"])
        await eventually_equal(lambda: store.open_connection("u1", "c2", 1), True, WAIT)
    finally:
        await admin.aclose()
        await backend.aclose()
