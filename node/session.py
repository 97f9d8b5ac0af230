"""One client connection's state, whatever dialect it speaks."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection

from node.ratelimit import TokenBucket


def new_conn_id() -> str:
    return secrets.token_hex(8)


@dataclass(eq=False, slots=True)
class Session:
    """A connected client. Compared by identity: it is a key of the hub's member dicts."""

    ws: ServerConnection
    user_id: str
    username: str
    dialect: str
    limiter: TokenBucket
    conn_id: str = field(default_factory=new_conn_id)
    #: room -> nick held in it (None when the join asked for none)
    rooms: dict[str, str | None] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.time)
    peer: str = ""
    #: Set once the client fell behind by more than --max-send-buffer and is being closed.
    slow: bool = False
