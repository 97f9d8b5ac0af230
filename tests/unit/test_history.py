"""The recovery decision on its own: a pure function of what a room still stores."""

from __future__ import annotations

import pytest

from roomcast.backends.history import HistoryResult, new_epoch, recovery_result
from roomcast.protocol.envelopes import Since


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


def test_new_epochs_are_short_random_hex() -> None:
    """An epoch is 8 hex digits (safe to splice into JSON) and differs each time."""
    epochs = {new_epoch() for _ in range(50)}
    assert len(epochs) == 50
    assert all(len(e) == 8 and int(e, 16) >= 0 for e in epochs)
