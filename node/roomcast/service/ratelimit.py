"""A token bucket per connection: ``rate`` tokens a second, at most ``burst`` saved up."""

from __future__ import annotations

from roomcast.clock import Clock, monotonic


class TokenBucket:
    """Allow a message when a token is available; otherwise say how long until one is."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate", "rejected_in_a_row")

    def __init__(
        self, rate: float, burst: int, clock: Clock = monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        #: Consecutive refusals; the caller closes a client that keeps flooding.
        self.rejected_in_a_row = 0

    def allow(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.rejected_in_a_row = 0
            return True
        self.rejected_in_a_row += 1
        return False

    def retry_after_ms(self) -> int:
        """Milliseconds until the next token (at least 1)."""
        return max(1, int((1.0 - self._tokens) / self.rate * 1000) + 1)
