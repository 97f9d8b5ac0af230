"""Draining a node: hand every client to the rest of the cluster without losing anything.

1. Readiness off: ``/readyz`` answers 503 and WebSocket handshakes get HTTP 503, so balancers and
   Kubernetes endpoints send new clients elsewhere (the listener stays open to say so).
2. Wait ``drain_delay`` for them to notice.
3. Close connections in small batches paced over ``drain_window``: each client first gets a
   ``reconnect`` envelope with a jittered ``retry_after_ms`` and its rooms' last delivered
   ``{offset, epoch}``, then a 1012 close. Paced closes spread the reconnects over the window.
4. The caller then removes presence, closes Redis and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from websockets.protocol import State

from roomcast import clock
from roomcast.protocol import dialects, envelopes
from roomcast.protocol.closecodes import CloseCode
from roomcast.transports.session import Session

log = structlog.get_logger("roomcast.drain")

# Constants, not settings: the window (--drain-window) is what an operator chooses; these only
# shape it. Ten batches a second, never all at once, and reconnects spread over one second more.
BATCH_INTERVAL = 0.1
MAX_RETRY_JITTER_MS = 1000

#: The rooms' positions a session has received up to (service.Service.positions).
Positions = Callable[[Session], dict[str, dict[str, Any]]]


def batch_plan(count: int, window: float, interval: float = BATCH_INTERVAL) -> list[int]:
    """How many connections to close in each batch so ``count`` closes span ``window``."""
    if count <= 0:
        return []
    batches = max(1, min(count, int(window / interval)))
    size = math.ceil(count / batches)
    plan = []
    left = count
    while left > 0:
        plan.append(min(size, left))
        left -= plan[-1]
    return plan


async def close_paced(
    sessions: Sequence[Session], positions: Positions, window: float,
    rng: random.Random | None = None,
) -> list[asyncio.Task[None]]:
    """Send ``reconnect`` + close 1012 to ``sessions`` in batches spread over ``window``.

    Returns the close tasks (each finishes when its closing handshake does).
    """
    rng = rng or random.Random()
    plan = batch_plan(len(sessions), window)
    interval = window / len(plan) if plan else 0.0
    tasks: list[asyncio.Task[None]] = []
    start = clock.monotonic()
    index = 0
    for batch_number, size in enumerate(plan):
        # Sleep to the batch's slot on the schedule (not after the previous batch), so that
        # slow batches do not stretch the drain past its window.
        delay = start + batch_number * interval - clock.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        for session in sessions[index : index + size]:
            if session.ws.close_code is not None:
                continue
            if session.codec == dialects.NATIVE:  # The other dialects have no hint.
                session.send(envelopes.reconnect(
                    rng.randint(0, MAX_RETRY_JITTER_MS), positions(session)))
            # What fan-out holds for it goes before the close (AdmittedConnection.close).
            tasks.append(asyncio.ensure_future(
                session.ws.close(CloseCode.SERVICE_RESTART, "service restart")))
        index += size
    return tasks


async def close_now(sessions: Sequence[Session], code: int, reason: str, within: float) -> None:
    """Close every session at once (the fast path), waiting at most ``within`` seconds; what
    fan-out holds for each goes before its close (AdmittedConnection.close)."""
    tasks = [asyncio.ensure_future(s.ws.close(code, reason)) for s in sessions
             if s.ws.close_code is None]
    if tasks:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), within)
        # The wait's end cancelled the closes still under way, before the limit of each
        # (AdmittedConnection.close, the same length, started a moment later) could drop its
        # connection: a client that does not read would outlive the shutdown. Dropped here.
        for session in sessions:
            if session.ws.protocol.state is not State.CLOSED:
                session.ws.transport.abort()
