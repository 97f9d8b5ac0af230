"""Presence events that scale: the user_joined/user_left of a large room, coalesced per interval
into one ``presence_diff`` (Phoenix's model).

Every join of a room of N members reaches its N members: filling a room costs O(N^2) frames, 12.5 M
for 5000 members. Above --presence-diff-above local members, a node holds the room's presence
events for --presence-diff-interval and sends them as one envelope with the users who joined and
who left, the last word per user (a user who left and came back within the interval is in
``joins`` only). Smaller rooms keep their single events. A diff is built once per node and room and
goes to the members as one frame; it may name the receiving member's own user, which a single
user_joined never shows it. A diff costs one write per member, so a room of more than
DIFF_WRITES_PER_SECOND x --presence-diff-interval local members waits longer: members /
DIFF_WRITES_PER_SECOND seconds (a second for 2,500), so that however large the room, its diffs
cost a node at most that many writes per second (Phoenix's tracker broadcasts every 1.5 s).
Events of a room with a diff pending join that diff even if the room has become small, so that
their order is kept. A room with a member of a compatibility dialect
(FastAPI, tutorial), which has no presence_diff, keeps single events.
"""

from __future__ import annotations

import asyncio
from typing import Any

from roomcast import clock
from roomcast.backends.broker import Publication
from roomcast.protocol import dialects, envelopes
from roomcast.service.rooms import Room, Rooms

#: Writes per second a large room's presence diffs may cost a node at most (one per member per
#: diff): the interval grows with the room beyond --presence-diff-interval to keep to it.
DIFF_WRITES_PER_SECOND = 2500


def diff_interval(members: int, least: float) -> float:
    """Seconds a room of ``members`` local members gathers its presence events."""
    return max(least, members / DIFF_WRITES_PER_SECOND)


class PresenceDiffs:
    """Coalesces presence events of large rooms; ``take`` is called for each one on the loop."""

    def __init__(self, rooms: Rooms, above: int, interval: float) -> None:
        self._rooms = rooms
        self._above = above
        self._interval = interval
        #: room -> user_id -> ("user_joined" | "user_left", the event's fields but type/room,
        #: the event as published).
        self._pending: dict[str, dict[str, tuple[str, dict[str, Any], bytes]]] = {}

    def take(self, publication: Publication, event: dict[str, Any]) -> bool:
        """True when ``event`` (a decoded user_joined/user_left of ``publication``) was taken
        into the room's next presence_diff; False: deliver it as it is."""
        name = publication.room
        pending = self._pending.get(name)
        if pending is None:
            room = self._rooms.get(name)
            if (not self._above or room is None or len(room) < self._above
                    or _has_other_dialects(room)):
                return False
            pending = self._pending[name] = {}
            asyncio.get_running_loop().call_later(diff_interval(len(room), self._interval),
                                                  self._flush, name)
        fields = {k: v for k, v in event.items() if k not in ("type", "room")}
        user_id = str(fields.get("user_id", ""))
        pending.pop(user_id, None)  # The latest word on a user goes last.
        pending[user_id] = (str(event.get("type")), fields, publication.payload)
        return True

    def _flush(self, name: str) -> None:
        pending = self._pending.pop(name, None)
        if not pending:
            return
        room = self._rooms.get(name)
        if room is not None and _has_other_dialects(room):
            # A FastAPI or tutorial member came meanwhile, and its dialect has no diff: the
            # events go out one by one, the last word per user, as they were published.
            for _, _, payload in pending.values():
                self._rooms.deliver(Publication(name, payload, ts_us=clock.now_us()))
            return
        joins = [fields for kind, fields, _ in pending.values() if kind == "user_joined"]
        leaves = [fields for kind, fields, _ in pending.values() if kind == "user_left"]
        self._rooms.deliver(Publication(name, envelopes.presence_diff(name, joins, leaves),
                                        ts_us=clock.now_us()))

    def pending(self) -> int:
        """Rooms with a presence_diff waiting (for tests and the metrics)."""
        return len(self._pending)


def _has_other_dialects(room: Room) -> bool:
    """True when some member speaks a compatibility dialect, which has no presence_diff."""
    return any(codec != dialects.NATIVE for codec in room.members)

