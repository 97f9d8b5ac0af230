"""The PresenceStore contract of one node, asserted once for MemoryPresence and RedisPresence.

Each test uses one store (one node); what several nodes sharing one Redis see of each other is
in test_presence_cluster.py. "No user_left" is proven with the recorder's settle barrier: a
sentinel user leaves after the decision in question, and its user_left is awaited first.
"""

from __future__ import annotations

import time

from roomcast.backends.presence import Member
from tests.contract.factories import GRACE, Backend, eventually_equal, member


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


def test_member_to_dict_omits_an_absent_nick() -> None:
    """A member without a nick is listed without a nick key; with one, it is included."""
    assert member("u1", "c1").to_dict() == {
        "user_id": "u1", "username": "U1", "node_id": "n1", "conn_id": "c1", "joined_at": 0
    }
    assert member("u1", "c1", "Ann").to_dict()["nick"] == "Ann"
    assert Member(**member("u1", "c1").to_dict()) == member("u1", "c1")


async def test_nick_claims_conflict_across_connections_case_insensitively(
    backend: Backend,
) -> None:
    """A nick held by one user is refused to other users in any letter case, in that room only;
    the holder may claim it again."""
    store, _ = await backend.presence()
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice")) is True
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice")) is True
    assert await store.claim_nick("r", "alice", member("u2", "c2", "alice")) is False
    assert await store.claim_nick("r", "ALICE", member("u3", "c3", "ALICE")) is False
    assert await store.claim_nick("other", "alice", member("u2", "c2", "alice")) is True


async def test_the_same_user_may_take_its_own_nick_over(backend: Backend) -> None:
    """A user's new connection (a reconnect) takes over the user's nick; others still may not."""
    store, _ = await backend.presence()
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice")) is True
    assert await store.claim_nick("r", "ALICE", member("u1", "c3", "ALICE")) is True
    assert await store.claim_nick("r", "alice", member("u3", "c4", "alice")) is False


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
