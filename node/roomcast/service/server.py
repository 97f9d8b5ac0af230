"""What a trusted backend may do through the server API (docs/API.md), on the same service.

A backend is not a connection: it publishes as the server (``from`` {"user_id": "",
"username": "server"}: no user id can be empty, and "server" is a reserved nick), into any room
of a known namespace, ``publish = "server"`` ones included; it reads presence and history without
joining. Cluster-wide actions (``disconnect``, ``unsubscribe``) go to every node over the
broker's control channel; each node applies them to its own connections (``Service.control``).
Refusals are ``ProtocolError`` (the API maps codes to HTTP statuses); a backend that cannot be
reached raises ``BrokerUnavailable``, and a publish that could not be stored is never reported as
done.
"""

from __future__ import annotations

import fnmatch
import hmac
from dataclasses import dataclass
from typing import Any, Final

import orjson

from roomcast import clock
from roomcast.backends.broker import Publication
from roomcast.backends.history import HistoryResult
from roomcast.config import Config
from roomcast.protocol import envelopes
from roomcast.protocol.closecodes import CloseCode
from roomcast.protocol.envelopes import ErrorCode, ProtocolError
from roomcast.service.auth import KeyFile, parse_secrets
from roomcast.service.service import Service

#: The ``from`` of what the server publishes.
SERVER_SENDER: Final = {"user_id": "", "username": "server"}
#: Longest idempotency key a publish may carry.
MAX_IDEMPOTENCY_KEY: Final = 128
#: Close codes a backend may ask ``disconnect`` to send: a normal or policy close, 4500 (the
#: default), or an application code of its own (4000-4499 the client reconnects, 4500-4999 it
#: does not) that roomcast does not already send for something else: one code, one meaning.
DISCONNECT_CODES: Final = frozenset({1000, 1008, int(CloseCode.DISCONNECTED)}) | (
    frozenset(range(4000, 5000)) - frozenset(int(c) for c in CloseCode))
#: A close reason is at most 123 bytes of UTF-8 (RFC 6455 section 5.5: a control frame's payload
#: is at most 125 bytes, two of which are the code).
MAX_REASON_BYTES: Final = 123


@dataclass(frozen=True, slots=True)
class Published:
    """A publish's outcome: where it went, and whether it was a retry of an earlier one."""

    room: str
    offset: int
    epoch: str
    duplicate: bool = False


class ApiKeys:
    """The server API's keys: --api-key (comma-separated) and every line of --api-key-file (read
    again when it changes). No key at all: the API is off."""

    def __init__(self, config: Config) -> None:
        self._fixed = tuple(k for k in config.api_key if k)
        self._file = (KeyFile(config.api_key_file, "--api-key-file", parse_secrets, clock.monotonic)
                      if config.api_key_file else None)

    def load(self) -> None:
        """Read the key file (ValueError naming --api-key-file when it is unusable)."""
        if self._file is not None:
            self._file.load()

    @property
    def enabled(self) -> bool:
        return bool(self._fixed) or self._file is not None

    def valid(self, offered: str) -> bool:
        """True when ``offered`` is one of the keys; every key is compared, in constant time."""
        keys = [*self._fixed, *(self._file.current() if self._file else ())]
        given = offered.encode()
        found = False
        for key in keys:
            found |= hmac.compare_digest(given, key.encode())
        return found


class ServerActions:
    """The server API's use cases."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.config = service.config

    def _room(self, room: Any) -> str:
        if not envelopes.valid_room(room):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                "room must be 1-64 characters of letters, digits and _ . : -")
        assert isinstance(room, str)
        self.service.namespace(room)  # unknown_namespace
        return room

    async def publish(self, room: Any, data: Any, idempotency_key: Any = None) -> Published:
        """Store and publish ``data`` as the server. With ``idempotency_key``, a retry within
        --idempotency-window returns the first result and publishes nothing."""
        room = self._room(room)
        data = envelopes.check_data(data)
        limit = self.config.max_message_size
        if len(orjson.dumps(data)) > limit:
            # What a client could not send, clients need not be able to receive either.
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"data is larger than --max-message-size ({limit} bytes)")
        if idempotency_key is not None and not (
                isinstance(idempotency_key, str) and 0 < len(idempotency_key)
                <= MAX_IDEMPOTENCY_KEY and envelopes.printable(idempotency_key)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "idempotency_key must be a printable "
                                f"string of 1 to {MAX_IDEMPOTENCY_KEY} characters")
        publication = await self._publish(room, data, idempotency_key)
        return Published(room, publication.offset, publication.epoch, publication.duplicate)

    async def _publish(self, room: str, data: Any, key: str | None) -> Publication:
        service = self.service
        prefix = envelopes.message_prefix(room, data, SERVER_SENDER, clock.now_ms())
        publication = await service.broker.publish(
            room, prefix, "server", idempotency_key=key, window=self.config.idempotency_window)
        if not publication.duplicate:
            service.metrics.publications.inc()
        return publication

    async def presence(self, room: Any) -> list[dict[str, Any]]:
        """Every connection in the room (empty where the namespace has presence off)."""
        return [m.to_dict() for m in await self.service.members(self._room(room))]

    async def presence_stats(self, room: Any) -> dict[str, int]:
        members = await self.service.members(self._room(room))
        return {"clients": len(members), "users": len({m.user_id for m in members})}

    async def history(self, room: Any, since: Any = None, limit: Any = None,
                      reverse: Any = False) -> dict[str, Any]:
        """Stored messages, oldest first (newest first with ``reverse``), with the room's
        position; ``since`` and ``limit`` as in the native history request."""
        room = self._room(room)
        body: dict[str, Any] = {"type": "history", "room": room}
        if since is not None:
            body["since"] = since
        if limit is not None:
            body["limit"] = limit
        request = envelopes.parse_object(body)  # The same checks as a client's request.
        assert isinstance(request, envelopes.History)
        if not isinstance(reverse, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "reverse must be true or false")
        result: HistoryResult = await self.service.history_store.read(
            room, request.since, request.limit)
        messages = [orjson.loads(m) for m in result.messages]
        if reverse:
            messages.reverse()
        reply: dict[str, Any] = {"offset": result.offset, "epoch": result.epoch,
                                 "messages": messages}
        if request.since is not None:
            reply["recovered"] = result.recovered
        return reply

    async def disconnect(self, user: Any, code: Any = CloseCode.DISCONNECTED,
                         reason: Any = "disconnected") -> None:
        """Close every connection of ``user`` on every node with ``code``."""
        user = _user(user)
        if not (isinstance(code, int) and not isinstance(code, bool)
                and code in DISCONNECT_CODES):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                "code must be 1000, 1008, 4500, or a code from 4000 to 4999 "
                                "that roomcast does not use itself (docs/PROTOCOL.md section 8)")
        if not (isinstance(reason, str) and len(reason.encode()) <= MAX_REASON_BYTES):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"reason must be a string of at most {MAX_REASON_BYTES} bytes")
        await self.service.broker.publish_control(orjson.dumps(
            {"op": "disconnect", "user": user, "code": code, "reason": reason}))

    async def unsubscribe(self, user: Any, room: Any) -> None:
        """Take every connection of ``user`` out of ``room``, on every node."""
        user, room = _user(user), self._room(room)
        await self.service.broker.publish_control(orjson.dumps(
            {"op": "unsubscribe", "user": user, "room": room}))

    async def rooms(self, pattern: Any = None) -> dict[str, int]:
        """Active rooms (someone is present) -> distinct users, cluster-wide; ``pattern`` is a
        glob (``chat:*``)."""
        if pattern is not None and not isinstance(pattern, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "pattern must be a string")
        rooms: dict[str, int] = (await self.service.presence_store.stats())["rooms"]
        if pattern:
            rooms = {r: n for r, n in rooms.items() if fnmatch.fnmatchcase(r, pattern)}
        return rooms

    async def info(self) -> dict[str, Any]:
        """The nodes of the cluster with their connection counts (as of their last lease
        renewal), and how many rooms have someone present, cluster-wide."""
        stats = await self.service.stats()
        return {"node_id": stats["node_id"], "nodes": stats["cluster"]["nodes"],
                "rooms": len(stats["cluster"]["rooms"])}


def _user(user: Any) -> str:
    if isinstance(user, str) and 0 < len(user) <= 64 and envelopes.printable(user):
        return user
    raise ProtocolError(ErrorCode.BAD_REQUEST, "user must be a printable string of 1 to 64 "
                        "characters")

