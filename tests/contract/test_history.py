"""The History contract (offsets assigned by the broker's publish, read back through History),
asserted once for MemoryHistory and RedisHistory.

TTL tests let time pass through ``backend.advance``: the fake clock for memory, real time (and
real PEXPIRE) for Redis, so they use a TTL of a fraction of a second.
"""

from __future__ import annotations

from typing import Any

import orjson

from roomcast.protocol.envelopes import Since
from tests.contract.factories import Backend, Pair

#: History TTL of the expiry tests; every step of time below is a fraction of it.
TTL = 0.5


def data_of(payload: bytes) -> Any:
    return orjson.loads(payload)["data"]


def offset_of(payload: bytes) -> int:
    offset: int = orjson.loads(payload)["offset"]
    return offset


async def five_messages(backend: Backend) -> tuple[Pair, str]:
    """A pair keeping 3 messages, after 5 publications to room r (data 1..5); and the epoch."""
    pair = await backend.pair(history_size=3)
    epochs = {(await pair.publish("r", n)).epoch for n in range(1, 6)}
    assert len(epochs) == 1
    return pair, epochs.pop()


async def test_history_keeps_only_the_newest_history_size_messages(backend: Backend) -> None:
    """History is trimmed to history_size messages, oldest dropped first."""
    pair, epoch = await five_messages(backend)
    result = await pair.history.read("r")
    assert (result.offset, result.epoch, result.recovered) == (5, epoch, True)
    assert [data_of(m) for m in result.messages] == [3, 4, 5]


async def test_history_returns_the_published_bytes(backend: Backend) -> None:
    """A stored message is read back as exactly the bytes publish returned and delivered."""
    pair = await backend.pair()
    published = [await pair.publish("r", {"n": n, "text": "é"}) for n in range(2)]
    assert (await pair.history.read("r")).messages == [p.payload for p in published]


async def test_history_limit_returns_the_newest_messages_in_order(backend: Backend) -> None:
    """read(limit=n) without since returns the newest n messages, oldest first."""
    pair, _ = await five_messages(backend)
    result = await pair.history.read("r", limit=2)
    assert [data_of(m) for m in result.messages] == [4, 5]


async def test_history_of_an_unused_room_has_offset_0_and_a_lasting_epoch(
    backend: Backend,
) -> None:
    """A room nobody published to reports offset 0 and an epoch that the next read and later
    messages keep, so that a client can continue from that position."""
    pair = await backend.pair()
    empty = await pair.history.read("new")
    assert (empty.offset, empty.messages, empty.recovered) == (0, [], True)
    assert empty.epoch
    assert (await pair.history.read("new")).epoch == empty.epoch
    assert (await pair.publish("new", 1)).epoch == empty.epoch
    resumed = await pair.history.read("new", Since(0, empty.epoch))
    assert resumed.recovered is True
    assert [data_of(m) for m in resumed.messages] == [1]


async def test_recovery_since_a_kept_offset_replays_the_rest(backend: Backend) -> None:
    """A client that saw offset 3 of 5 gets offsets 4 and 5 back and recovered=True."""
    pair, epoch = await five_messages(backend)
    result = await pair.history.read("r", Since(3, epoch))
    assert result.recovered is True
    assert [offset_of(m) for m in result.messages] == [4, 5]


async def test_recovery_since_just_before_the_oldest_kept_is_recovered(
    backend: Backend,
) -> None:
    """Offsets 3-5 kept: a client that saw offset 2 misses nothing and recovers all three."""
    pair, epoch = await five_messages(backend)
    result = await pair.history.read("r", Since(2, epoch))
    assert result.recovered is True
    assert [data_of(m) for m in result.messages] == [3, 4, 5]


async def test_recovery_since_a_trimmed_offset_is_not_recovered(backend: Backend) -> None:
    """Offsets 3-5 kept: a client that saw offset 1 missed offset 2, so recovered=False."""
    pair, epoch = await five_messages(backend)
    result = await pair.history.read("r", Since(1, epoch))
    assert (result.recovered, result.messages, result.offset, result.epoch) == (
        False, [], 5, epoch
    )


async def test_recovery_since_another_epoch_is_not_recovered(backend: Backend) -> None:
    """A position from another epoch cannot be continued, whatever its offset."""
    pair = await backend.pair()
    publication = await pair.publish("r", 1)
    result = await pair.history.read("r", Since(0, publication.epoch + "0"))
    assert (result.recovered, result.messages, result.epoch) == (False, [], publication.epoch)


async def test_recovery_since_an_offset_ahead_of_the_room_is_not_recovered(
    backend: Backend,
) -> None:
    """A position past the room's last offset is impossible, so it is not recovered."""
    pair, epoch = await five_messages(backend)
    result = await pair.history.read("r", Since(6, epoch))
    assert (result.recovered, result.messages, result.offset) == (False, [], 5)


async def test_recovery_since_the_current_offset_is_recovered_with_no_messages(
    backend: Backend,
) -> None:
    """A client that already saw the newest message recovers with nothing to replay."""
    pair = await backend.pair()
    await pair.publish("r", 1)
    publication = await pair.publish("r", 2)
    result = await pair.history.read("r", Since(2, publication.epoch))
    assert (result.recovered, result.messages, result.offset) == (True, [], 2)


async def test_recovery_since_with_limit_returns_the_oldest_missed_first(
    backend: Backend,
) -> None:
    """With since and limit, the messages right after since come first (a page to continue)."""
    pair = await backend.pair()
    for n in range(1, 4):
        publication = await pair.publish("r", n)
    result = await pair.history.read("r", Since(0, publication.epoch), limit=2)
    assert result.recovered is True
    assert [data_of(m) for m in result.messages] == [1, 2]


async def test_history_size_0_stores_nothing_but_still_numbers_messages(
    backend: Backend,
) -> None:
    """With history disabled, offsets still advance and old positions cannot be recovered."""
    pair = await backend.pair(history_size=0)
    await pair.publish("r", 1)
    publication = await pair.publish("r", 2)
    assert publication.offset == 2
    assert (await pair.history.read("r")).messages == []
    assert (await pair.history.read("r", Since(1, publication.epoch))).recovered is False
    assert (await pair.history.read("r", Since(2, publication.epoch))).recovered is True


async def test_history_ttl_expiry_starts_a_new_epoch(backend: Backend) -> None:
    """A room idle longer than history_ttl starts over with a new epoch and offset 1."""
    pair = await backend.pair(history_size=10, history_ttl=TTL)
    old = await pair.publish("r", 1)
    await backend.advance(TTL * 1.5)
    result = await pair.history.read("r", Since(1, old.epoch))
    assert (result.recovered, result.offset, result.messages) == (False, 0, [])
    assert result.epoch and result.epoch != old.epoch
    new = await pair.publish("r", 2)
    assert (new.offset, new.epoch) == (1, result.epoch)


async def test_history_ttl_is_counted_from_the_last_publication(backend: Backend) -> None:
    """A room that keeps being published to keeps its epoch and its history, however long
    it has existed in all."""
    pair = await backend.pair(history_size=10, history_ttl=TTL)
    first = await pair.publish("r", 1)
    for n in range(2, 5):
        await backend.advance(TTL * 0.5)
        publication = await pair.publish("r", n)
        assert (publication.offset, publication.epoch) == (n, first.epoch)
    await backend.advance(TTL * 0.5)
    result = await pair.history.read("r", Since(0, first.epoch))
    assert result.recovered is True
    assert [data_of(m) for m in result.messages] == [1, 2, 3, 4]


async def test_history_ttl_0_never_expires(backend: Backend) -> None:
    """history_ttl=0 keeps a room's epoch and history however long it is idle: still there
    after a room with a TTL, published to at the same time, has expired."""
    forever = await backend.pair(history_size=10, history_ttl=0)
    control = await backend.pair(history_size=10, history_ttl=TTL)
    first = await forever.publish("kept", 1)
    expiring = await control.publish("expiring", 1)
    await backend.advance(TTL * 1.5)
    assert (await control.history.read("expiring", Since(1, expiring.epoch))).recovered is False
    result = await forever.history.read("kept", Since(0, first.epoch))
    assert (result.recovered, result.epoch, len(result.messages)) == (True, first.epoch, 1)


async def test_a_room_only_read_is_forgotten_after_the_idle_ttl(backend: Backend) -> None:
    """A room read but never published to keeps its epoch while it is read, and is gone (a new
    epoch) once --idle-room-ttl passed without a read: nothing lingers for the history TTL."""
    pair = await backend.pair(idle_ttl=TTL)
    first = await pair.history.read("idle")
    for _ in range(3):  # Each read within the idle TTL keeps the epoch (and extends it).
        await backend.advance(TTL / 2)
        assert (await pair.history.read("idle")).epoch == first.epoch
    await backend.advance(TTL * 2)
    again = await pair.history.read("idle")
    assert again.offset == 0 and again.epoch != first.epoch


async def test_restart_epoch_starts_one_new_epoch_even_once_history_is_past_the_node(
    backend: Backend,
) -> None:
    """A node that found history gone back restarts the room's epoch even when publishes with
    reused offsets have carried the room past its position meanwhile; a second node asking
    with the old epoch gets the same new epoch, and the room starts over from offset 1."""
    pair, epoch = await five_messages(backend)
    first = await pair.history.restart_epoch("r", epoch)
    assert first != epoch
    assert await pair.history.restart_epoch("r", epoch) == first
    after = await pair.publish("r", 6)
    assert (after.offset, after.epoch) == (1, first)
    result = await pair.history.read("r")
    assert (result.offset, result.epoch) == (1, first)
