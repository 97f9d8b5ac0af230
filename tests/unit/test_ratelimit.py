"""The per-connection token bucket, driven by a fake clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.service.ratelimit import ALLOWED, PAUSE_CREDIT_SECONDS, TokenBucket, Verdict
from tests.fakes import FakeClock


def drain(bucket: TokenBucket) -> int:
    """Take every token available now; return how many were taken."""
    taken = 0
    while bucket.allow():
        taken += 1
    return taken


def test_a_fresh_bucket_allows_exactly_burst_messages_at_once() -> None:
    """A new connection may send `burst` messages at once and no more."""
    bucket = TokenBucket(rate=2.0, burst=5, clock=FakeClock())
    assert [bucket.allow() for _ in range(6)] == [True] * 5 + [False]


def test_tokens_refill_at_rate_per_second() -> None:
    """After draining, one message is allowed per 1/rate seconds."""
    clock = FakeClock()
    bucket = TokenBucket(rate=4.0, burst=2, clock=clock)
    drain(bucket)
    clock.advance(0.125)  # half a token
    assert bucket.allow() is False
    clock.advance(0.125)  # a whole token in total
    assert bucket.allow() is True
    assert bucket.allow() is False
    clock.advance(1.0)
    assert drain(bucket) == 2  # 4 tokens refilled, but capped at burst


def test_idle_time_never_saves_more_than_burst() -> None:
    """However long a connection is idle, it can only send `burst` messages at once."""
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=3, clock=clock)
    clock.advance(3600.0)
    assert drain(bucket) == 3


def test_retry_after_ms_is_the_time_until_the_next_token() -> None:
    """A refused client is told to wait just long enough (within 1 ms) for the next token."""
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=1, clock=clock)
    drain(bucket)
    assert bucket.allow() is False
    hint = bucket.retry_after_ms()
    assert 500 <= hint <= 501
    clock.advance((hint - 2) / 1000)
    assert bucket.allow() is False
    clock.advance(2 / 1000)
    assert bucket.allow() is True


def test_retry_after_ms_shrinks_as_the_bucket_refills() -> None:
    """A client refused again later is told a shorter wait."""
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    drain(bucket)
    clock.advance(0.75)
    assert bucket.allow() is False
    assert 250 <= bucket.retry_after_ms() <= 251


def test_retry_after_ms_is_at_least_1() -> None:
    """The hint is never 0 ms, even when a token is already available."""
    bucket = TokenBucket(rate=1000.0, burst=10, clock=FakeClock())
    assert bucket.retry_after_ms() == 1


def test_rejected_in_a_row_counts_consecutive_refusals_and_resets_on_success() -> None:
    """Consecutive refusals are counted, so a flooding client can be closed; a success resets."""
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert bucket.rejected_in_a_row == 0
    bucket.allow()
    for expected in (1, 2, 3):
        assert bucket.allow() is False
        assert bucket.rejected_in_a_row == expected
    clock.advance(1.0)
    assert bucket.allow() is True
    assert bucket.rejected_in_a_row == 0


@settings(database=None, deadline=None, max_examples=200)
@given(
    rate=st.floats(0.5, 100.0),
    burst=st.integers(1, 50),
    steps=st.lists(
        st.tuples(st.floats(0.0, 2.0), st.sampled_from(["drain", "pause", "resume"])),
        max_size=60),
)
def test_fuzz_never_allows_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, str]]
) -> None:
    """Over any schedule, pauses and resumes included, allowed messages never exceed
    burst + rate x elapsed seconds."""
    clock = FakeClock()
    start = clock.now
    bucket = TokenBucket(rate=rate, burst=burst, clock=clock)
    allowed = 0
    for step, action in steps:
        clock.advance(step)
        if action == "pause":
            bucket.pause()
        elif action == "resume":
            bucket.resume()
        allowed += drain(bucket)
    assert allowed <= burst + rate * (clock.now - start) + 1e-6
    bucket.resume()
    # The bucket always refills to at least one token after 1/rate seconds.
    clock.advance(1.0 / rate + 1e-6)
    assert bucket.allow() is True


def test_charge_says_allowed_then_refused_with_the_wait_then_flood() -> None:
    """charge() gives each frame its verdict: allowed within the burst, then refused with
    retry_after_ms, and flood from the flood_after-th refusal in a row on."""
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=2, clock=clock, flood_after=3)
    assert [bucket.charge() for _ in range(2)] == [ALLOWED, ALLOWED]
    refused = [bucket.charge() for _ in range(4)]
    assert [v.allowed for v in refused] == [False] * 4
    assert [v.flood for v in refused] == [False, False, True, True]
    assert all(500 <= v.retry_after_ms <= 501 for v in refused)
    clock.advance(0.5)
    assert bucket.charge() is ALLOWED and bucket.rejected_in_a_row == 0


def test_charge_never_says_flood_without_flood_after() -> None:
    """A bucket without flood_after only refuses."""
    bucket = TokenBucket(rate=1.0, burst=1, clock=FakeClock())
    bucket.charge()
    assert bucket.charge() == Verdict(False, bucket.retry_after_ms(), False)


def test_frames_that_waited_in_the_socket_during_a_pause_are_not_refused() -> None:
    """A client that sent rate/2 a second while the node was not reading has all of those
    frames admitted when they arrive together after resume, beyond the burst."""
    clock = FakeClock()
    bucket = TokenBucket(rate=30.0, burst=10, clock=clock, flood_after=20)
    bucket.pause()
    clock.advance(3.0)  # 3 s at 20 msg/s: 60 frames wait in the socket.
    bucket.resume()
    assert [bucket.charge() for _ in range(60)] == [ALLOWED] * 60


def test_without_a_pause_the_same_backlog_would_be_refused() -> None:
    """The same 60 frames arriving at once after idle time only get the burst."""
    clock = FakeClock()
    bucket = TokenBucket(rate=30.0, burst=10, clock=clock)
    clock.advance(3.0)
    assert drain(bucket) == 10


def test_the_pause_credit_expires_after_a_second() -> None:
    """Credit for a pause that is not used within PAUSE_CREDIT_SECONDS is gone: the bucket is
    back to its burst."""
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
    bucket.pause()
    clock.advance(10.0)
    bucket.resume()
    clock.advance(PAUSE_CREDIT_SECONDS + 0.001)
    assert drain(bucket) == 5


def test_a_pause_earns_nothing_twice() -> None:
    """Time while paused is credited at resume instead of refilling the bucket: a pause of t
    seconds after a drained bucket yields rate x t frames, no more."""
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
    drain(bucket)
    bucket.pause()
    clock.advance(2.0)
    bucket.resume()
    assert drain(bucket) == 20


def test_resume_without_pause_and_pause_twice_change_nothing() -> None:
    """resume() without a pause is a no-op; a second pause() keeps the first one's start."""
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
    drain(bucket)
    bucket.resume()
    bucket.pause()
    clock.advance(1.0)
    bucket.pause()
    clock.advance(1.0)
    bucket.resume()
    assert drain(bucket) == 20


def test_refund_gives_a_token_back_within_the_burst() -> None:
    """A free frame's token is given back, never beyond the burst."""
    bucket = TokenBucket(rate=1.0, burst=2, clock=FakeClock())
    bucket.allow()
    bucket.refund()
    bucket.refund()
    assert drain(bucket) == 2
