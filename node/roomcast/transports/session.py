"""One WebSocket client connection: the service's ``Connection``, over python-websockets."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

import structlog
from websockets.asyncio.server import ServerConnection

from roomcast.service.auth import RoomClaims
from roomcast.service.connection import Identity
from roomcast.service.ratelimit import TokenBucket
from roomcast.transports.writer import FrameWriter, SendBudget

log = structlog.get_logger("roomcast.conn")


def new_conn_id() -> str:
    return secrets.token_hex(8)


@dataclass(eq=False, slots=True)
class Session:
    """A connected client. Compared by identity: it is a key of the rooms' member dicts."""

    ws: ServerConnection
    writer: FrameWriter
    identity: Identity
    #: The dialect it speaks, which is also the encoding of its fan-out.
    codec: str
    limiter: TokenBucket
    #: The slow-consumer policy (--max-send-buffer) that every write to this client passes.
    budget: SendBudget
    conn_id: str = field(default_factory=new_conn_id)
    #: room -> nick held in it (None when the join asked for none)
    rooms: dict[str, str | None] = field(default_factory=dict)
    peer: str = ""
    #: Set once the client fell behind by more than --max-send-buffer and is being closed.
    slow: bool = False
    #: room -> the room token that granted it (service/permissions.py).
    room_grants: dict[str, RoomClaims] = field(default_factory=dict)
    #: The id of the connect frame, echoed by the welcome that answers it.
    welcome_id: Any = None
    #: The pending step of the token expiry watch (refresh_required, then the close).
    expiry: asyncio.TimerHandle | None = None

    def stop_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    def send(self, payload: bytes) -> None:
        """Write one envelope now, after the fan-out still pending for this client.

        The one path of every single-client write (replies, history pages, replays, pongs,
        errors, the drain hint): a client already more than --max-send-buffer behind is cut
        off with 4000 instead, exactly as fan-out does, and is written nothing more.
        """
        if self.budget.admits(self):
            self.writer.write_now(self.ws, payload)

    def send_soon(self, payload: bytes) -> None:
        """Write one envelope with the node's next flush (writer.FLUSH_INTERVAL, 1 ms, at
        most), after the fan-out pending for this client and before anything sent after it:
        the acks of a burst of publishes share one write. The same send budget as ``send``."""
        if self.budget.admits(self):
            self.writer.write_soon(self.ws, payload)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake in the background, after what fan-out still holds for
        this client (unless it is being cut off as a slow consumer: nothing more for it), which
        the connection's close writes first (websocket.AdmittedConnection.close)."""
        task = asyncio.ensure_future(self.ws.close(code, reason))
        task.add_done_callback(_log_task_error)


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())
