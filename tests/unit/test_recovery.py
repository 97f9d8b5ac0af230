"""The recovery invariant's pure parts: exactly-once positions and the replay/live splice."""

from __future__ import annotations

from roomcast.backends.broker import Publication
from roomcast.backends.history import HistoryResult
from roomcast.protocol.envelopes import Since
from roomcast.service.recovery import Position, splice, stored_publications


def pub(offset: int, epoch: str = "e1", origin: str = "") -> Publication:
    return Publication("r", b"m%d" % offset if offset else b"event", offset, epoch, origin)


def test_position_admits_each_stored_offset_once() -> None:
    """A repeat of an offset already delivered in the same epoch is refused; newer ones pass."""
    position = Position()
    assert [position.advance(pub(n)) for n in (1, 2, 2, 1, 3)] == [True, True, False, False, True]
    assert (position.offset, position.epoch) == (3, "e1")


def test_position_starts_again_in_a_new_epoch() -> None:
    """Offsets of a new epoch (history lost and renumbered) are new even when smaller."""
    position = Position(7, "e1")
    assert position.advance(pub(1, "e2")) is True
    assert (position.offset, position.epoch) == (1, "e2")


def test_events_are_always_new_and_do_not_move_the_position() -> None:
    """Ephemeral events (offset 0) pass every time and leave the position alone."""
    position = Position(4, "e1")
    assert position.advance(pub(0)) and position.advance(pub(0))
    assert (position.offset, position.epoch) == (4, "e1")


def test_splice_replays_history_then_only_what_history_did_not_cover() -> None:
    """Queued publications already in the history read are dropped; newer ones follow it."""
    stored = HistoryResult(5, "e1", [b"m4", b"m5"])
    out = splice(stored, True, [pub(4), pub(5), pub(6), pub(7)])
    assert out == [b"m4", b"m5", b"m6", b"m7"]


def test_splice_without_replay_still_drops_what_the_position_covers() -> None:
    """A plain join (no since) gets only publications after the position it was told."""
    stored = HistoryResult(5, "e1", [b"m5"])
    assert splice(stored, False, [pub(5), pub(6)]) == [b"m6"]


def test_splice_keeps_another_epochs_publications() -> None:
    """A publication of a new epoch is never mistaken for one already covered."""
    stored = HistoryResult(9, "e1", [])
    assert splice(stored, True, [pub(1, "e2")]) == [b"m1"]


def test_splice_drops_the_receivers_own_events_only() -> None:
    """Events queued during the replay reach the receiver unless it sent them itself."""
    stored = HistoryResult(0, "e1", [])
    mine, theirs = pub(0, origin="me"), Publication("r", b"other", 0, "", "you")
    assert splice(stored, False, [mine, theirs], receiver="me") == [b"other"]


def test_stored_publications_number_a_recovered_read_from_since() -> None:
    """A recovered read after offset 3 holds offsets 4, 5, ... in the room's epoch."""
    publications = stored_publications("r", Since(3, "e1"), HistoryResult(5, "e1", [b"a", b"b"]))
    assert [(p.offset, p.epoch, p.payload) for p in publications] == [(4, "e1", b"a"),
                                                                      (5, "e1", b"b")]
