"""Sans-I/O translation for the two compatibility dialects.

Rooms are shared between dialects: a native client, a FastAPI-tutorial client and a
python-websockets-tutorial client in the same room all see each other's messages. The broker
carries native envelopes; each node re-encodes a publication once per dialect present in the room
(``encode_*`` below), never once per member.

* ``fastapi``: the widely copied FastAPI chat tutorial, ``/ws/chat/{room_id}?user_id=&username=``.
* ``tutorial``: the python-websockets tutorial chat on ``/`` (join, chat, leave, info).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

NATIVE = "native"
FASTAPI = "fastapi"
TUTORIAL = "tutorial"


def iso(ts_ms: int | float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-20T22:38:27.123+00:00."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds")


def as_text(data: Any) -> str:
    """Message data as the text a text-only dialect shows: strings as is, the rest as JSON."""
    return data if isinstance(data, str) else orjson.dumps(data).decode()


# --- FastAPI chat tutorial -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Say:
    """Publish ``content`` to the room."""

    content: Any


@dataclass(frozen=True, slots=True)
class Typing:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Unknown:
    kind: str


FastApiAction = Say | Typing | Ping | Unknown


def parse_fastapi(frame: str | bytes) -> FastApiAction:
    """A client frame of the FastAPI dialect. Plain text (not a JSON object) is a message."""
    text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return Say(text)
    if not isinstance(obj, dict):
        return Say(text)
    kind = obj.get("type", "message")
    if kind == "message":
        return Say(obj.get("content", ""))
    if kind == "typing":
        return Typing()
    if kind == "ping":
        return Ping()
    return Unknown(_shown(kind))


def _shown(kind: Any) -> str:
    """An unknown ``type`` as an error message may quote it: at most 32 characters, and an
    array or object only by its brackets (its text could nest 1000 levels deep)."""
    if isinstance(kind, list):
        return "[...]"
    if isinstance(kind, dict):
        return "{...}"
    return str(kind)[:32]


def fastapi_user_event(kind: str, room: str, user_id: str, username: str, ts_ms: int) -> bytes:
    verb = "joined" if kind == "user_joined" else "left"
    return orjson.dumps({
        "type": kind, "user_id": user_id, "username": username, "room_id": room,
        "timestamp": iso(ts_ms), "message": f"{username} {verb} the room",
    })


def fastapi_members(user_ids: list[str]) -> bytes:
    return orjson.dumps({"type": "room_members", "members": user_ids, "count": len(user_ids)})


def fastapi_error(message: str) -> bytes:
    return orjson.dumps({"type": "error", "message": message})


def encode_fastapi(env: dict[str, Any]) -> bytes | None:
    """A native envelope as the FastAPI dialect shows it (None: not shown)."""
    kind = env.get("type")
    room = env.get("room", "")
    if kind == "message":
        sender = env.get("from", {})
        return orjson.dumps({
            "type": "message", "user_id": sender.get("user_id"),
            "username": sender.get("username"), "content": env.get("data"),
            "timestamp": iso(env.get("ts", 0)), "room_id": room,
        })
    if kind == "typing":
        sender = env.get("from", {})
        return orjson.dumps({
            "type": "typing", "user_id": sender.get("user_id"),
            "username": sender.get("username"), "room_id": room,
        })
    if kind in ("user_joined", "user_left"):
        return fastapi_user_event(
            kind, room, env.get("user_id", ""), env.get("username", ""), env.get("ts", 0)
        )
    return None


# --- python-websockets tutorial chat ------------------------------------------------------------


def tutorial(kind: str, nick: str, text: str) -> bytes:
    return orjson.dumps({"type": kind, "nick": nick, "text": text})


def clean_nick(raw: Any, max_length: int) -> str:
    """The tutorial's rule: strip, then cut to ``max_length`` characters."""
    return raw.strip()[:max_length].strip() if isinstance(raw, str) else ""


def parse_tutorial(frame: str | bytes) -> dict[str, Any] | None:
    """A tutorial-dialect frame as a dict, or None when it is not a JSON object."""
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def encode_tutorial(env: dict[str, Any]) -> bytes | None:
    kind = env.get("type")
    if kind == "message":
        return tutorial("chat", env.get("from", {}).get("username", ""),
                        as_text(env.get("data")))
    if kind == "user_joined":
        return tutorial("join", env.get("username", ""), "")
    if kind == "user_left":
        return tutorial("leave", env.get("username", ""), "")
    return None


ENCODERS = {FASTAPI: encode_fastapi, TUTORIAL: encode_tutorial}
