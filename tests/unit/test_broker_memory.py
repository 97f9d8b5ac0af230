"""The in-process broker and presence store of a lone node, and the recovery decision."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

import node.broker
from node import protocol
from node.broker import (
    BrokerUnavailable,
    HistoryResult,
    MemoryBroker,
    Publication,
    recovery_result,
)
from node.presence import Member, MemoryPresence
from node.protocol import Since

GRACE = 0.05
WAIT = 2.0


def prefix(data: Any) -> bytes:
    return protocol.message_prefix("r", data, protocol.sender("u1", "Ann"), 1)


def data_of(payload: bytes) -> Any:
    return orjson.loads(payload)["data"]


class FakeTime:
    """Stands in for the ``time`` module inside node.broker: monotonic() moves on request."""

    def __init__(self) -> None:
        self.now = 5000.0

    def monotonic(self) -> float:
        return self.now

    def time_ns(self) -> int:
        return time.time_ns()


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    # Only node.broker sees the fake; the event loop keeps the real clock.
    monkeypatch.setattr(node.broker, "time", fake)
    return fake


async def started(broker: MemoryBroker) -> list[Publication]:
    delivered: list[Publication] = []
    await broker.start(delivered.append)
    return delivered


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    memory = MemoryBroker(history_size=3)
    yield memory
    await memory.close()


# --- recovery_result (pure) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "first_offset", "recovered"),
    [
        (Since(10, "e"), 5, True),  # caught up: nothing to send
        (Since(7, "e"), 5, True),  # offsets 8-10 still stored
        (Since(4, "e"), 5, True),  # offset 5 is the oldest kept: no gap
        (Since(3, "e"), 5, False),  # offset 4 was trimmed: gap
        (Since(7, "other"), 5, False),  # different epoch: history was reset
        (Since(11, "e"), 5, False),  # ahead of the room: impossible position
        (Since(7, "e"), 0, False),  # nothing stored at all
    ],
)
def test_recovery_result_decides_whether_since_continues_without_a_gap(
    since: Since, first_offset: int, recovered: bool
) -> None:
    """A since position is recovered only when no message after it is missing."""
    stored = [b"m"] if since.offset < 10 else []
    result = recovery_result(10, "e", first_offset, stored, since)
    assert result == HistoryResult(10, "e", stored if recovered else [], recovered)


def test_recovery_result_without_since_returns_the_messages() -> None:
    """Without a since position the stored messages are returned as they are."""
    assert recovery_result(4, "e", 3, [b"a", b"b"], None) == HistoryResult(4, "e", [b"a", b"b"])


def test_recovery_result_at_the_current_offset_is_recovered_with_no_messages() -> None:
    """A client that saw the last message recovers with nothing to replay."""
    assert recovery_result(6, "e", 1, [b"stale"], Since(6, "e")) == HistoryResult(6, "e", [], True)


# --- MemoryBroker ----------------------------------------------------------------------------


async def test_broker_is_unavailable_until_started_and_after_close() -> None:
    """Publishing before start or after close raises BrokerUnavailable; close is idempotent."""
    memory = MemoryBroker()
    assert memory.available is False
    with pytest.raises(BrokerUnavailable):
        await memory.publish("r", prefix(1), "c1")
    await started(memory)
    assert memory.available is True
    await memory.close()
    await memory.close()
    assert memory.available is False
    with pytest.raises(BrokerUnavailable):
        await memory.publish("r", prefix(1), "c1")
    with pytest.raises(BrokerUnavailable):
        await memory.publish_event("r", b"{}")


async def test_offsets_count_from_1_without_gaps_and_the_epoch_is_stable(
    broker: MemoryBroker,
) -> None:
    """Each message of a room gets the next offset, starting at 1, all in one epoch."""
    await started(broker)
    publications = [await broker.publish("r", prefix(n), "c1") for n in range(5)]
    assert [p.offset for p in publications] == [1, 2, 3, 4, 5]
    assert len({p.epoch for p in publications}) == 1
    assert publications[0].epoch
    for n, publication in enumerate(publications):
        body = orjson.loads(publication.payload)
        assert (body["data"], body["offset"], body["epoch"]) == (
            n, publication.offset, publication.epoch
        )
        assert publication.origin == "c1"
        assert publication.room == "r"


async def test_rooms_have_independent_offsets(broker: MemoryBroker) -> None:
    """Publishing in one room does not advance another room's offset."""
    await started(broker)
    await broker.publish("a", prefix(1), "c1")
    await broker.publish("a", prefix(2), "c1")
    assert (await broker.publish("b", prefix(3), "c1")).offset == 1


async def test_publications_reach_the_node_only_for_subscribed_rooms(broker: MemoryBroker) -> None:
    """on_publication sees messages and events of subscribed rooms only."""
    delivered = await started(broker)
    await broker.publish("quiet", prefix("x"), "c1")
    await broker.subscribe("live")
    kept = await broker.publish("live", prefix("y"), "c1")
    await broker.publish_event("live", b'{"type":"typing"}', "c2")
    await broker.publish_event("quiet", b'{"type":"typing"}', "c2")
    await broker.unsubscribe("live")
    await broker.publish("live", prefix("z"), "c1")
    assert [(p.room, p.payload, p.offset, p.origin) for p in delivered] == [
        ("live", kept.payload, 1, "c1"),
        ("live", b'{"type":"typing"}', 0, "c2"),
    ]
    assert delivered[1].epoch == ""


async def test_publish_returns_the_same_bytes_that_are_delivered(broker: MemoryBroker) -> None:
    """The publisher's acknowledgement and the members' copy are the same encoded message."""
    delivered = await started(broker)
    await broker.subscribe("r")
    publication = await broker.publish("r", prefix("hi"), "c1")
    assert delivered == [publication]


async def test_history_keeps_only_the_newest_history_size_messages(broker: MemoryBroker) -> None:
    """History is trimmed to history_size messages, oldest dropped first."""
    await started(broker)
    last = None
    for n in range(1, 6):
        last = await broker.publish("r", prefix(n), "c1")
    assert last is not None
    result = await broker.history("r")
    assert (result.offset, result.epoch, result.recovered) == (5, last.epoch, True)
    assert [data_of(m) for m in result.messages] == [3, 4, 5]


async def test_history_limit_returns_the_newest_messages_in_order(broker: MemoryBroker) -> None:
    """history(limit=n) without since returns the newest n messages, oldest first."""
    await started(broker)
    for n in range(1, 6):
        await broker.publish("r", prefix(n), "c1")
    result = await broker.history("r", limit=2)
    assert [data_of(m) for m in result.messages] == [4, 5]


async def test_history_of_an_unused_room_has_offset_0_and_an_epoch(broker: MemoryBroker) -> None:
    """A room nobody published to reports offset 0 and an epoch that later messages keep."""
    await started(broker)
    empty = await broker.history("new")
    assert (empty.offset, empty.messages, empty.recovered) == (0, [], True)
    assert empty.epoch
    assert (await broker.publish("new", prefix(1), "c1")).epoch == empty.epoch
    resumed = await broker.history("new", Since(0, empty.epoch))
    assert resumed.recovered is True
    assert [data_of(m) for m in resumed.messages] == [1]


async def test_recovery_since_a_kept_offset_replays_the_rest(broker: MemoryBroker) -> None:
    """A client that saw offset 3 of 5 gets offsets 4 and 5 back and recovered=True."""
    await started(broker)
    for n in range(1, 6):
        publication = await broker.publish("r", prefix(n), "c1")
    result = await broker.history("r", Since(3, publication.epoch))
    assert result.recovered is True
    assert [orjson.loads(m)["offset"] for m in result.messages] == [4, 5]


async def test_recovery_since_the_last_offset_before_the_oldest_kept_is_recovered(
    broker: MemoryBroker,
) -> None:
    """Offsets 3-5 kept: a client that saw offset 2 misses nothing and recovers all three."""
    await started(broker)
    for n in range(1, 6):
        publication = await broker.publish("r", prefix(n), "c1")
    result = await broker.history("r", Since(2, publication.epoch))
    assert result.recovered is True
    assert [data_of(m) for m in result.messages] == [3, 4, 5]


async def test_recovery_since_a_trimmed_offset_is_not_recovered(broker: MemoryBroker) -> None:
    """Offsets 3-5 kept: a client that saw offset 1 missed offset 2, so recovered=False."""
    await started(broker)
    for n in range(1, 6):
        publication = await broker.publish("r", prefix(n), "c1")
    result = await broker.history("r", Since(1, publication.epoch))
    assert (result.recovered, result.messages, result.offset) == (False, [], 5)


async def test_recovery_since_another_epoch_is_not_recovered(broker: MemoryBroker) -> None:
    """A position from another epoch cannot be continued, whatever its offset."""
    await started(broker)
    publication = await broker.publish("r", prefix(1), "c1")
    result = await broker.history("r", Since(0, publication.epoch + "0"))
    assert (result.recovered, result.messages, result.epoch) == (False, [], publication.epoch)


async def test_recovery_since_the_current_offset_is_recovered_with_no_messages(
    broker: MemoryBroker,
) -> None:
    """A client that already saw the newest message recovers with nothing to replay."""
    await started(broker)
    await broker.publish("r", prefix(1), "c1")
    publication = await broker.publish("r", prefix(2), "c1")
    result = await broker.history("r", Since(2, publication.epoch))
    assert (result.recovered, result.messages, result.offset) == (True, [], 2)


async def test_recovery_since_with_limit_returns_the_oldest_missed_first(
    broker: MemoryBroker,
) -> None:
    """With since and limit, the messages right after since come first (a page to continue)."""
    await started(broker)
    for n in range(1, 4):
        publication = await broker.publish("r", prefix(n), "c1")
    result = await broker.history("r", Since(0, publication.epoch), limit=2)
    assert result.recovered is True
    assert [data_of(m) for m in result.messages] == [1, 2]


async def test_history_size_0_stores_nothing_but_still_numbers_messages() -> None:
    """With history disabled, offsets still advance and old positions cannot be recovered."""
    memory = MemoryBroker(history_size=0)
    await started(memory)
    await memory.publish("r", prefix(1), "c1")
    publication = await memory.publish("r", prefix(2), "c1")
    assert publication.offset == 2
    assert (await memory.history("r")).messages == []
    assert (await memory.history("r", Since(1, publication.epoch))).recovered is False
    assert (await memory.history("r", Since(2, publication.epoch))).recovered is True


async def test_history_ttl_expiry_starts_a_new_epoch(fake_time: FakeTime) -> None:
    """A room idle longer than history_ttl starts over with a new epoch and offset 1."""
    memory = MemoryBroker(history_size=10, history_ttl=60.0)
    await started(memory)
    old = await memory.publish("r", prefix(1), "c1")
    fake_time.now += 60.5
    result = await memory.history("r", Since(1, old.epoch))
    assert (result.recovered, result.offset, result.messages) == (False, 0, [])
    assert result.epoch != old.epoch
    new = await memory.publish("r", prefix(2), "c1")
    assert (new.offset, new.epoch) == (1, result.epoch)


async def test_history_ttl_is_counted_from_the_last_publication(fake_time: FakeTime) -> None:
    """A room that keeps being published to keeps its epoch and its history."""
    memory = MemoryBroker(history_size=10, history_ttl=60.0)
    await started(memory)
    first = await memory.publish("r", prefix(1), "c1")
    for n in range(2, 5):
        fake_time.now += 45.0
        publication = await memory.publish("r", prefix(n), "c1")
        assert (publication.offset, publication.epoch) == (n, first.epoch)
    fake_time.now += 59.0
    result = await memory.history("r", Since(0, first.epoch))
    assert result.recovered is True
    assert [data_of(m) for m in result.messages] == [1, 2, 3, 4]


async def test_history_ttl_0_never_expires(fake_time: FakeTime) -> None:
    """history_ttl=0 keeps a room's epoch and history however long it is idle."""
    memory = MemoryBroker(history_size=10, history_ttl=0)
    await started(memory)
    first = await memory.publish("r", prefix(1), "c1")
    fake_time.now += 10 * 365 * 86400.0
    result = await memory.history("r", Since(0, first.epoch))
    assert (result.recovered, result.epoch, len(result.messages)) == (True, first.epoch, 1)


# --- MemoryPresence --------------------------------------------------------------------------


def member(user_id: str, conn_id: str, nick: str | None = None, joined_at: int = 0) -> Member:
    return Member(user_id, user_id.upper(), "n1", conn_id, joined_at, nick)


class LeftRecorder:
    """Records user_left decisions; lets a test wait for a given user's, bounded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self._events: dict[str, asyncio.Event] = {}

    def event(self, user_id: str) -> asyncio.Event:
        return self._events.setdefault(user_id, asyncio.Event())

    async def __call__(self, room: str, user_id: str, username: str) -> None:
        self.calls.append((room, user_id, username))
        self.event(user_id).set()

    async def wait_for(self, user_id: str) -> None:
        await asyncio.wait_for(self.event(user_id).wait(), timeout=WAIT)

    async def settle(self, presence: MemoryPresence, room: str = "sentinel-room") -> None:
        """Wait until every user_left decision scheduled so far has been delivered.

        Timers with the same delay fire in the order they were set, so once a sentinel user's
        user_left, scheduled now, has arrived, every earlier one has had its chance to fire.
        """
        sentinel = member("sentinel", "sentinel-conn")
        await presence.add(room, sentinel)
        await presence.remove(room, sentinel)
        await self.wait_for("sentinel")

    def users_left(self) -> list[tuple[str, str, str]]:
        return [call for call in self.calls if call[1] != "sentinel"]


@pytest.fixture
async def presence() -> AsyncIterator[tuple[MemoryPresence, LeftRecorder]]:
    store = MemoryPresence("n1", grace=GRACE)
    recorder = LeftRecorder()
    await store.start(recorder)
    yield store, recorder
    await store.close()


async def test_add_is_true_only_for_a_users_first_connection(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """user_joined is due for a user's first connection in a room, not for their second tab."""
    store, _ = presence
    assert await store.add("r", member("u1", "c1")) is True
    assert await store.add("r", member("u1", "c2")) is False
    assert await store.add("r", member("u2", "c3")) is True
    assert await store.add("other", member("u1", "c4")) is True


async def test_user_left_fires_once_after_the_grace_window(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """After a user's last connection is gone for the grace window, user_left fires exactly once."""
    store, recorder = presence
    first, second = member("u1", "c1"), member("u1", "c2")
    await store.add("r", first)
    await store.add("r", second)
    await store.remove("r", first)
    await store.remove("r", second)
    await store.remove("r", second)  # a duplicate remove must not schedule another leave
    await recorder.wait_for("u1")
    await recorder.settle(store)
    assert recorder.users_left() == [("r", "u1", "U1")]
    assert await store.members("r") == []


async def test_reconnect_within_grace_causes_no_user_left_and_no_user_joined(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """A user who reconnects within the grace window neither leaves nor joins again."""
    store, recorder = presence
    await store.add("r", member("u1", "c1"))
    await store.remove("r", member("u1", "c1"))
    assert await store.add("r", member("u1", "c2")) is False
    await recorder.settle(store)
    assert recorder.users_left() == []
    assert [m.conn_id for m in await store.members("r")] == ["c2"]


async def test_a_reconnect_then_a_final_leave_gives_exactly_one_user_left(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """A user who drops, reconnects in time and then leaves for good gets one user_left."""
    store, recorder = presence
    await store.add("r", member("u1", "c1"))
    await store.remove("r", member("u1", "c1"))
    await store.add("r", member("u1", "c2"))
    await store.remove("r", member("u1", "c2"))
    await recorder.wait_for("u1")
    await recorder.settle(store)
    assert recorder.users_left() == [("r", "u1", "U1")]


async def test_user_with_another_connection_left_does_not_leave(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """Closing one of two tabs does not make the user leave the room."""
    store, recorder = presence
    await store.add("r", member("u1", "c1"))
    await store.add("r", member("u1", "c2"))
    await store.remove("r", member("u1", "c1"))
    await recorder.settle(store)
    assert recorder.users_left() == []


async def test_close_cancels_pending_user_left(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """A clean shutdown drops pending user_left decisions instead of firing them later."""
    store, recorder = presence
    await store.add("r", member("u1", "c1"))
    await store.remove("r", member("u1", "c1"))
    await store.close()
    await recorder.settle(store)
    assert recorder.users_left() == []


async def test_members_are_listed_oldest_first_and_stats_count_users(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """members() lists every connection by join time; stats count distinct users per room."""
    store, _ = presence
    await store.add("r", member("u2", "c2", joined_at=2000))
    await store.add("r", member("u1", "c1", joined_at=1000))
    await store.add("r", member("u1", "c3", joined_at=3000))
    assert [m.conn_id for m in await store.members("r")] == ["c1", "c2", "c3"]
    store.set_connection_count(3)
    assert await store.stats() == {
        "nodes": {"n1": {"connections": 3, "alive": True}}, "rooms": {"r": 2}
    }


def test_member_to_dict_omits_an_absent_nick() -> None:
    """A member without a nick is listed without a nick key; with one, it is included."""
    assert member("u1", "c1").to_dict() == {
        "user_id": "u1", "username": "U1", "node_id": "n1", "conn_id": "c1", "joined_at": 0
    }
    assert member("u1", "c1", "Ann").to_dict()["nick"] == "Ann"


async def test_nick_claims_conflict_across_connections_case_insensitively(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """A nick held by one user is refused to other users in any letter case, in that room only;
    the same user may take it over from a new connection (a reconnect)."""
    store, _ = presence
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice")) is True
    assert await store.claim_nick("r", "Alice", member("u1", "c1", "Alice")) is True
    assert await store.claim_nick("r", "alice", member("u2", "c2", "alice")) is False
    assert await store.claim_nick("r", "ALICE", member("u1", "c3", "ALICE")) is True
    assert await store.claim_nick("r", "alice", member("u3", "c4", "alice")) is False
    assert await store.claim_nick("other", "alice", member("u2", "c2", "alice")) is True


async def test_nick_is_released_when_its_holder_leaves(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """Once the holder's connection leaves the room, another connection can take the nick."""
    store, _ = presence
    holder = member("u1", "c1", "Alice")
    await store.claim_nick("r", "Alice", holder)
    await store.add("r", holder)
    await store.remove("r", holder)
    assert await store.claim_nick("r", "aLiCe", member("u2", "c2", "aLiCe")) is True


async def test_removing_a_refused_claimant_keeps_the_holders_nick(
    presence: tuple[MemoryPresence, LeftRecorder],
) -> None:
    """A connection that was refused a nick cannot release it for the holder by leaving."""
    store, _ = presence
    await store.claim_nick("r", "Alice", member("u1", "c1", "Alice"))
    refused = member("u2", "c2", "alice")
    assert await store.claim_nick("r", "alice", refused) is False
    await store.add("r", refused)
    await store.remove("r", refused)
    assert await store.claim_nick("r", "ALICE", member("u3", "c3", "ALICE")) is False
