"""Redis-specific: what several nodes' presence stores sharing one Redis see of each other.

MemoryPresence serves one node only, so these cases have no memory counterpart; whatever a single
node sees is in test_presence.py, asserted for both. The nodes here share one LeftRecorder, so
that "exactly once" and "not at all" are judged cluster-wide (whichever node announces).
"""

from __future__ import annotations

import time

from roomcast.backends.presence import PresenceStore
from tests.contract.factories import GRACE, LeftRecorder, RedisBackend, eventually_equal, member


async def two_nodes(
    backend: RedisBackend,
) -> tuple[PresenceStore, PresenceStore, LeftRecorder]:
    """Presence stores of nodes n1 and n2 on one Redis, with one recorder for both."""
    recorder = LeftRecorder()
    a, _ = await backend.presence("n1", recorder)
    b, _ = await backend.presence("n2", recorder)
    return a, b, recorder


async def test_user_joined_is_per_user_across_nodes(redis_backend: RedisBackend) -> None:
    """A user's first connection on any node is the join; one on another node is not."""
    a, b, _ = await two_nodes(redis_backend)
    assert await a.add("r", member("u1", "c1", node_id="n1")) is True
    assert await b.add("r", member("u1", "c2", node_id="n2")) is False
    assert await b.add("r", member("u2", "c3", node_id="n2")) is True


async def test_every_node_lists_the_members_of_all_nodes_oldest_first(
    redis_backend: RedisBackend,
) -> None:
    """members() on either node lists the connections of both nodes, by join time."""
    a, b, _ = await two_nodes(redis_backend)
    middle = member("u1", "c1", joined_at=2000, node_id="n1")
    oldest = member("u2", "c2", "Bob", joined_at=1000, node_id="n2")
    newest = member("u3", "c3", joined_at=3000, node_id="n1")
    await a.add("r", middle)
    await b.add("r", oldest)
    await a.add("r", newest)
    assert await a.members("r") == [oldest, middle, newest]
    assert await b.members("r") == [oldest, middle, newest]


async def test_user_left_waits_for_the_last_connection_on_any_node_and_comes_once(
    redis_backend: RedisBackend,
) -> None:
    """A user with connections on two nodes leaves only when both are gone, and exactly one
    node announces it."""
    a, b, recorder = await two_nodes(redis_backend)
    await a.add("r", member("u1", "c1", node_id="n1"))
    await b.add("r", member("u1", "c2", node_id="n2"))
    await a.remove("r", member("u1", "c1", node_id="n1"))
    await recorder.settle(a)
    assert recorder.users_left() == []
    await b.remove("r", member("u1", "c2", node_id="n2"))
    await recorder.settle(a)
    assert recorder.users_left() == [("r", "u1", "U1")]


async def test_reconnect_to_another_node_within_grace_causes_no_user_left(
    redis_backend: RedisBackend,
) -> None:
    """A user who drops on one node and comes back on another within the grace window
    neither leaves nor joins again."""
    a, b, recorder = await two_nodes(redis_backend)
    await a.add("r", member("u1", "c1", node_id="n1"))
    await a.remove("r", member("u1", "c1", node_id="n1"))
    assert await b.add("r", member("u1", "c2", node_id="n2")) is False
    await recorder.settle(b)
    assert recorder.users_left() == []
    assert [m.conn_id for m in await a.members("r")] == ["c2"]


async def test_a_clean_close_removes_a_nodes_entries_at_once_and_a_survivor_announces(
    redis_backend: RedisBackend,
) -> None:
    """Closing a node drops its entries from every query at once; its users' user_left comes
    from a surviving node, once, after the grace window."""
    a, b, recorder = await two_nodes(redis_backend)
    await a.add("r", member("u1", "c1", node_id="n1"))
    await b.add("r", member("u2", "c2", node_id="n2"))
    closed_at = time.monotonic()
    await a.close()
    assert await b.members("r") == [member("u2", "c2", node_id="n2")]
    await recorder.settle(b)
    assert recorder.users_left() == [("r", "u1", "U1")]
    assert recorder.times["u1"] - closed_at >= GRACE - 0.01


async def test_a_user_reconnecting_elsewhere_after_a_clean_close_does_not_flap(
    redis_backend: RedisBackend,
) -> None:
    """A rolling restart: the user of a closed node who reconnects to another node within the
    grace window gets neither user_left nor user_joined."""
    a, b, recorder = await two_nodes(redis_backend)
    await a.add("r", member("u1", "c1", node_id="n1"))
    await a.close()
    assert await b.add("r", member("u1", "c2", node_id="n2")) is False
    await recorder.settle(b)
    assert recorder.users_left() == []


async def test_a_nick_held_on_one_node_is_refused_to_other_users_on_another(
    redis_backend: RedisBackend,
) -> None:
    """Nick conflicts are cluster-wide and case-insensitive; the holder's own user may take the
    nick over from another node."""
    a, b, _ = await two_nodes(redis_backend)
    assert await a.claim_nick("r", "Alice", member("u1", "c1", "Alice", node_id="n1")) is True
    assert await b.claim_nick("r", "alice", member("u2", "c2", "alice", node_id="n2")) is False
    assert await b.claim_nick("r", "ALICE", member("u1", "c3", "ALICE", node_id="n2")) is True
    assert await a.claim_nick("r", "alice", member("u2", "c4", "alice", node_id="n1")) is False


async def test_a_nick_is_released_cluster_wide_when_its_holder_leaves(
    redis_backend: RedisBackend,
) -> None:
    """Once the holding connection leaves on its node, a user on another node may take it."""
    a, b, _ = await two_nodes(redis_backend)
    holder = member("u1", "c1", "Alice", node_id="n1")
    assert await a.claim_nick("r", "Alice", holder) is True
    await a.add("r", holder)
    await a.remove("r", holder)
    assert await b.claim_nick("r", "alice", member("u2", "c2", "alice", node_id="n2")) is True


async def test_the_nicks_of_a_cleanly_closed_node_are_free(redis_backend: RedisBackend) -> None:
    """Closing a node releases the nicks its connections held."""
    a, b, _ = await two_nodes(redis_backend)
    holder = member("u1", "c1", "Alice", node_id="n1")
    assert await a.claim_nick("r", "Alice", holder) is True
    await a.add("r", holder)
    await a.close()
    assert await b.claim_nick("r", "alice", member("u2", "c2", "alice", node_id="n2")) is True


async def test_stats_list_every_live_node_and_count_users_across_nodes(
    redis_backend: RedisBackend,
) -> None:
    """stats() on any node lists every live node with its connection count and counts each
    room's distinct users over all nodes; a closed node drops out."""
    a, b, _ = await two_nodes(redis_backend)
    await a.add("r", member("u1", "c1", node_id="n1"))
    await b.add("r", member("u1", "c2", node_id="n2"))
    await b.add("r", member("u2", "c3", node_id="n2"))
    a.set_connection_count(1)
    b.set_connection_count(2)
    both = {"nodes": {"n1": {"connections": 1, "alive": True},
                      "n2": {"connections": 2, "alive": True}}, "rooms": {"r": 2}}
    await eventually_equal(a.stats, both)
    await eventually_equal(b.stats, both)
    await a.close()
    alone = {"nodes": {"n2": {"connections": 2, "alive": True}}, "rooms": {"r": 2}}
    assert await b.stats() == alone
