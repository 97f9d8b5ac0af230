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
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from node import protocol
from node.closecodes import CloseCode

if TYPE_CHECKING:
    from node.hub import Hub
    from node.session import Session

log = structlog.get_logger("roomcast.drain")

BATCH_INTERVAL = 0.1  # Seconds between batches: 10 batches a second, never all at once.
MAX_RETRY_JITTER_MS = 1000


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


def reconnect_hint(session: Session, hub: Hub, retry_after_ms: int) -> bytes:
    """The ``reconnect`` envelope for one client: retry hint plus its rooms' positions."""
    rooms: dict[str, dict[str, Any]] = {}
    for name in session.rooms:
        room = hub.rooms.get(name)
        # A session still replaying history has not received up to the room's position.
        if room is not None and room.epoch and session not in room.pending:
            rooms[name] = {"offset": room.offset, "epoch": room.epoch}
    return protocol.reconnect(retry_after_ms, rooms)


async def close_paced(
    sessions: Sequence[Session], hub: Hub, window: float, rng: random.Random | None = None
) -> list[asyncio.Task[None]]:
    """Send ``reconnect`` + close 1012 to ``sessions`` in batches spread over ``window``.

    Returns the close tasks (each finishes when its closing handshake does).
    """
    rng = rng or random.Random()
    plan = batch_plan(len(sessions), window)
    interval = window / len(plan) if plan else 0.0
    tasks: list[asyncio.Task[None]] = []
    start = time.monotonic()
    index = 0
    for batch_number, size in enumerate(plan):
        # Sleep to the batch's slot on the schedule (not after the previous batch), so that
        # slow batches do not stretch the drain past its window.
        delay = start + batch_number * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        for session in sessions[index : index + size]:
            if session.ws.close_code is not None:
                continue
            if session.dialect == "native":
                hub.write(session, reconnect_hint(
                    session, hub, rng.randint(0, MAX_RETRY_JITTER_MS)))
            tasks.append(asyncio.ensure_future(
                session.ws.close(CloseCode.SERVICE_RESTART, "service restart")))
        index += size
    return tasks


async def close_now(sessions: Sequence[Session], code: int, reason: str, within: float) -> None:
    """Close every session at once (the fast path), waiting at most ``within`` seconds."""
    tasks = [asyncio.ensure_future(s.ws.close(code, reason)) for s in sessions
             if s.ws.close_code is None]
    if tasks:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), within)
