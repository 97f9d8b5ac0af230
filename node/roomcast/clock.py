"""The one clock module: wall time for timestamps on the wire, monotonic time for durations.

Every timestamp a client or Redis sees is unix milliseconds (``now_ms``) or, for fan-out latency,
unix microseconds (``now_us``). Durations and deadlines inside a process use ``monotonic``, which
never jumps when the wall clock is set. Tests replace a module's clock by passing another callable,
never by patching this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: A source of seconds, as ``time.monotonic``; injected where a test needs to move time.
Clock = Callable[[], float]

monotonic: Clock = time.monotonic


def now_ms() -> int:
    """Unix time in whole milliseconds: the ``ts`` of envelopes, lease deadlines in Redis."""
    return time.time_ns() // 1_000_000


def now_us() -> int:
    """Unix time in microseconds: a publication's send time, for fan-out latency."""
    return time.time_ns() // 1_000
