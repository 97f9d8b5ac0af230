"""The embedded node's state stays bounded: rooms only asked about are forgotten, expired
history is swept out, released nicks leave nothing behind."""

from __future__ import annotations

from roomcast.backends.history import SWEEP_INTERVAL, MemoryHistory
from roomcast.backends.presence import Member, MemoryPresence
from roomcast.protocol import envelopes
from tests.fakes import FakeClock


async def test_rooms_only_read_are_forgotten_after_the_idle_ttl() -> None:
    """Asking about 10,000 room names keeps nothing once the idle TTL and a sweep have passed."""
    clock = FakeClock()
    history = MemoryHistory(100, 86400.0, clock=clock, idle_ttl=300.0)
    for i in range(10_000):
        await history.read(f"probe-{i}")
    assert len(history) == 10_000
    clock.now += 300.0 + SWEEP_INTERVAL + 1
    await history.read("trigger")
    assert len(history) == 1


async def test_a_room_read_again_keeps_its_epoch_while_it_is_read() -> None:
    """Reads within the idle TTL keep an unpublished room's epoch (a client can continue)."""
    clock = FakeClock()
    history = MemoryHistory(100, 86400.0, clock=clock, idle_ttl=300.0)
    first = await history.read("r")
    for _ in range(5):
        clock.now += 200.0
        assert (await history.read("r")).epoch == first.epoch
    clock.now += 301.0
    assert (await history.read("r")).epoch != first.epoch


async def test_published_rooms_live_for_the_history_ttl_not_the_idle_one() -> None:
    """A room with messages keeps them for --history-ttl, then is swept out too."""
    clock = FakeClock()
    history = MemoryHistory(100, 3600.0, clock=clock, idle_ttl=300.0)
    history.append("r", envelopes.message_prefix("r", 1, envelopes.sender("u", "U"), 1))
    clock.now += 1000.0
    assert (await history.read("r")).offset == 1
    clock.now += 3600.0 + SWEEP_INTERVAL
    assert (await history.read("other")).offset == 0
    assert len(history) == 1  # "r" was swept; only "other" is held.


async def test_released_nicks_leave_no_room_behind() -> None:
    """Claiming and releasing nicks in many rooms leaves the nick table empty."""
    presence = MemoryPresence("n1", 0.0)
    for i in range(100):
        member = Member("u", "U", "n1", "c1", 0, f"nick{i}")
        assert await presence.claim_nick(f"room-{i}", f"nick{i}", member)
        await presence.add(f"room-{i}", member)
        await presence.remove(f"room-{i}", member)
    assert presence._nicks == {} and presence._rooms == {}
    await presence.close()
