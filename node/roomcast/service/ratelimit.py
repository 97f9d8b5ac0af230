"""A token bucket per connection: ``rate`` tokens a second, at most ``burst`` saved up.

Every frame a client sends is charged as it arrives (transports/websocket.py), never when the node
gets round to it, so that a backlog the node built up (say, while Redis was stalled) is never
counted against the client. One case needs more than arrival times: while the node has stopped
reading a connection (flow control: too many of its messages wait to be served), the client's
frames wait in the socket and all arrive at once when reading resumes. ``pause`` and ``resume``
bracket that time, and the tokens it would have earned are credited without the burst cap, for
the frames that waited; the total a client can send stays within ``burst + rate * elapsed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from roomcast.clock import Clock, monotonic

#: How long the credit for a pause lasts once reading resumes. Not a setting: it only has to
#: cover reading what waited in the socket (milliseconds), and whatever it is, the credit never
#: lets a client send more than ``burst + rate * elapsed`` in total.
PAUSE_CREDIT_SECONDS: Final = 1.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the budget said of one frame when it arrived."""

    allowed: bool
    #: For a refused frame: milliseconds until the next token.
    retry_after_ms: int = 0
    #: Refused, and the ``flood_after``-th refusal in a row or later: close the connection.
    flood: bool = False
    #: Refused, but to be dropped without an error (a typing frame over its own budget).
    quiet: bool = False


ALLOWED: Final = Verdict(True)


class TokenBucket:
    """Allow a message when a token is available; otherwise say how long until one is."""

    __slots__ = ("_clock", "_credit", "_credit_until", "_last", "_paused_at", "_tokens",
                 "burst", "flood_after", "rate", "rejected_in_a_row")

    def __init__(
        self, rate: float, burst: int, clock: Clock = monotonic, flood_after: int = 0
    ) -> None:
        self.rate = rate
        self.burst = burst
        #: Refusals in a row from which ``charge`` says ``flood`` (0: never).
        self.flood_after = flood_after
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._paused_at: float | None = None
        self._credit = 0.0
        self._credit_until = 0.0
        #: Consecutive refusals; the caller closes a client that keeps flooding.
        self.rejected_in_a_row = 0

    def _refill(self, now: float) -> None:
        if self._paused_at is None:  # While paused, resume() credits the time instead.
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def allow(self) -> bool:
        now = self._clock()
        self._refill(now)
        if self._credit and now > self._credit_until:
            self._credit = 0.0
        if self._credit >= 1.0:
            self._credit -= 1.0
        elif self._tokens >= 1.0:
            self._tokens -= 1.0
        else:
            self.rejected_in_a_row += 1
            return False
        self.rejected_in_a_row = 0
        return True

    def charge(self) -> Verdict:
        """Take a token for one frame that has just arrived; the verdict on it."""
        if self.allow():
            return ALLOWED
        flood = 0 < self.flood_after <= self.rejected_in_a_row
        return Verdict(False, self.retry_after_ms(), flood)

    def refund(self) -> None:
        """Give back one token (a frame that turned out to be free), within the burst."""
        self._tokens = min(self.burst, self._tokens + 1.0)

    def pause(self) -> None:
        """The node stopped reading this connection: its frames now wait in the socket."""
        if self._paused_at is None:
            now = self._clock()
            self._refill(now)
            self._paused_at = now

    def resume(self) -> None:
        """The node reads again: credit the paused time in full (no burst cap), for the frames
        that waited, for ``PAUSE_CREDIT_SECONDS``."""
        if self._paused_at is None:
            return
        now = self._clock()
        self._credit += (now - self._paused_at) * self.rate
        self._credit_until = now + PAUSE_CREDIT_SECONDS
        self._paused_at = None
        self._last = now

    def retry_after_ms(self) -> int:
        """Milliseconds until the next token (at least 1)."""
        return max(1, int((1.0 - self._tokens) / self.rate * 1000) + 1)
