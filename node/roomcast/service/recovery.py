"""The recovery invariant, in one place: replay from history, buffer live publications meanwhile,
hand over without a gap or a duplicate.

Three callers need it and use only this module:

* a join with ``since`` (``join_with_replay``): the client gets what it missed, then live;
* the drain hint (``delivered``): the position a client has really received up to in each room;
* the resubscribe after a Redis outage (``catch_up``): whatever was published while this node
  was not subscribed is fetched from history and delivered before anything newer.

The rule is the same each time. A subscription is made first and live publications queue from
that moment; only then is the position read from history, so that nothing published after the
read can be missed. The queue is then replayed through ``splice``, which drops what history
already covered, and the hand-over to live delivery happens without yielding to the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from roomcast.backends.broker import BrokerUnavailable, Publication
from roomcast.backends.history import History, HistoryResult
from roomcast.protocol.envelopes import Since
from roomcast.service.connection import Connection

if TYPE_CHECKING:  # rooms.py imports Position from here; this module only takes Rooms as input.
    from roomcast.service.rooms import Room, Rooms

log = structlog.get_logger("roomcast.recovery")


@dataclass(slots=True)
class Position:
    """The last stored publication a room delivered on this node: exactly-once at the node."""

    offset: int = 0
    epoch: str = ""
    #: The payload delivered at ``offset``: a refill checks that history still holds it there.
    last: bytes = field(default=b"", compare=False)

    def advance(self, publication: Publication) -> bool:
        """True when ``publication`` is new here (and move past it); False for a repeat.

        Ephemeral events (offset 0) are always new. A stored publication of another epoch
        starts the count again: the room's history was lost and renumbered.
        """
        if not publication.offset:
            return True
        if publication.epoch == self.epoch and publication.offset <= self.offset:
            return False
        self.offset, self.epoch, self.last = publication.offset, publication.epoch, \
            publication.payload
        return True

    def skips_to(self, publication: Publication) -> bool:
        """True when stored publications are missing between this position and
        ``publication``: an offset skipped in the same epoch, or a new epoch that does not
        start at offset 1. Unknown (never set) positions skip nothing."""
        if not publication.offset or not self.epoch:
            return False
        if publication.epoch == self.epoch:
            return publication.offset > self.offset + 1
        return publication.offset > 1


def splice(
    stored: HistoryResult, replay: bool, queued: Iterable[Publication], receiver: str = ""
) -> list[bytes]:
    """What a receiver gets, in order, when history ``stored`` was read after live publications
    started queueing for it: the stored messages (when ``replay``), then each queued publication
    that history did not already cover. Events from ``receiver`` itself are dropped.

    Pure: tests/unit/test_recovery.py checks it without a network.
    """
    out = list(stored.messages) if replay else []
    for publication in queued:
        if publication.offset == 0:
            if not receiver or publication.origin != receiver:
                out.append(publication.payload)
        elif publication.epoch != stored.epoch or publication.offset > stored.offset:
            out.append(publication.payload)
    return out


def stored_publications(room: str, since: Since, stored: HistoryResult) -> list[Publication]:
    """The messages of a recovered read after ``since`` as publications with their offsets
    (a recovered read is contiguous: offsets since+1, since+2, ...)."""
    return [
        Publication(room, payload, since.offset + 1 + i, stored.epoch)
        for i, payload in enumerate(stored.messages)
    ]


async def join_with_replay(
    rooms: Rooms,
    history: History,
    conn: Connection,
    room: str,
    since: Since | None,
    enter: Callable[[], Awaitable[Any]],
    reply: Callable[[HistoryResult], None],
) -> HistoryResult:
    """Join ``conn`` to ``room`` and hand it over to live delivery without a gap.

    Subscribes (publications queue for ``conn``), reads the position and, with ``since``, what
    was missed; awaits ``enter`` (presence); then, without yielding, calls ``reply`` with the
    result, sends the replay and what queued, and makes ``conn`` a live member. On any failure
    the caller cleans up (the connection is still listed as joining).
    """
    state = await rooms.join(room, conn, replaying=True)
    while state.refilled is not None:
        # The room is refilling (a resubscribe or a gap): its messages up to now reach this
        # node through the refill; the position read below comes after them.
        await state.refilled.wait()
    result = await history.read(room, since, None if since else 1)
    await enter()
    # From here to the end: no await, so no publication can slip between replay and live.
    reply(result)
    replay = since is not None and result.recovered
    for payload in splice(result, replay, rooms.finish_replay(room, conn), conn.conn_id):
        conn.send(payload)
    # History (on the command connection) can be ahead of this node's pub/sub stream: the live
    # copies of what the read covered may still be on their way. They must not reach this
    # connection a second time, while every other member still gets them.
    position = state.position
    if result.offset and not (position.epoch == result.epoch
                              and position.offset >= result.offset):
        state.floors[conn] = Position(result.offset, result.epoch)
    return result


def delivered(rooms: Rooms, conn: Connection) -> dict[str, dict[str, Any]]:
    """For the drain hint: each room's ``{offset, epoch}`` that ``conn`` has received up to.

    A connection still replaying history has not, so its room is left out (it rejoins from its
    own last position).
    """
    positions: dict[str, dict[str, Any]] = {}
    for name in conn.rooms:
        room = rooms.get(name)
        if room is not None and room.position.epoch and not room.is_replaying(conn):
            positions[name] = {"offset": room.position.offset, "epoch": room.position.epoch}
    return positions


def catch_up(rooms: Rooms, history: History, names: Iterable[str]) -> list[asyncio.Task[None]]:
    """After a resubscribe: refill each room from history, in order, before newer publications.

    Must be called synchronously when the broker reports the resubscribe, so that every
    publication from the new subscription queues behind the refill.
    """
    tasks = []
    for name in names:
        room = rooms.get(name)
        if room is not None:
            task = begin_refill(rooms, history, room)
            if task is not None:
                tasks.append(task)
    return tasks


def begin_refill(
    rooms: Rooms, history: History, room: Room, first: Publication | None = None
) -> asyncio.Task[None] | None:
    """Queue the room's publications from now on (``first`` included) and fetch what this node
    missed since its position; None when a refill is already running (it covers this one)."""
    if room.backlog is not None:
        if first is not None:
            room.backlog.append(first)
        return None
    room.backlog, room.refilled = ([first] if first is not None else []), asyncio.Event()
    return asyncio.ensure_future(_refill(rooms, history, room))


async def _refill(rooms: Rooms, history: History, room: Room) -> None:
    refilled = room.refilled
    position = Position(room.position.offset, room.position.epoch, room.position.last)
    missed: list[Publication] = []
    #: Set when some messages cannot be delivered: the position the members jump to.
    lost: Position | None = None
    #: History went back in the same epoch: that epoch is retired here.
    rolled_back = False
    try:
        if position.epoch:
            since = Since(position.offset, position.epoch)
            # One message back, to check that history still holds what was delivered last.
            check = position.offset >= 1 and bool(position.last)
            stored = await history.read(
                room.name, Since(position.offset - 1, position.epoch) if check else since)
            diverged = False
            if check and stored.recovered and stored.offset >= position.offset:
                diverged = stored.messages[0] != position.last
                stored = replace(stored, messages=stored.messages[1:])
            if diverged or (stored.epoch == position.epoch and stored.offset < position.offset):
                # History went back below what this node delivered, or holds another message
                # where it delivered one (a failover lost the newest writes; a deposed master
                # ran a late publish): those offsets name other messages now. A new epoch, and
                # the members are told that what follows starts over.
                epoch = await history.restart_epoch(room.name, position.epoch)
                log.error("room history went back below what was delivered; new epoch",
                          room=room.name, delivered=position.offset, stored=stored.offset,
                          diverged=diverged, epoch=epoch)
                lost = Position(0, epoch)
                rolled_back = True
            elif stored.recovered:
                missed = stored_publications(room.name, since, stored)
            else:
                # History no longer has the gap. What it holds of the current epoch from its
                # first offset can still be delivered (a Redis that lost its data and started a
                # new epoch); the rest is lost, and the members are told so, explicitly.
                start = Since(0, stored.epoch)
                current = await history.read(room.name, start)
                if current.recovered and current.messages:
                    missed = stored_publications(room.name, start, current)
                    lost = Position(0, stored.epoch)
                else:
                    lost = Position(stored.offset, stored.epoch)
    except BrokerUnavailable:
        log.warning("could not read history to refill a gap", room=room.name)
        lost = position  # Refined below from what queued meanwhile.
    except Exception:
        log.error("refill crashed", room=room.name, exc_info=True)
        lost = position
    finally:
        backlog, room.backlog = room.backlog or [], None
        if rolled_back:
            # Whatever still comes in the retired epoch may reuse an offset already delivered:
            # it is dropped (the gap notice below tells the members), here and from now on.
            room.retired = position.epoch
            backlog = [p for p in backlog if p.epoch != position.epoch]
        if lost is not None and not missed:
            # Everything queued meanwhile is delivered: the gap ends just before the first of it.
            queued = [p for p in backlog if p.offset]
            if queued:
                lost = Position(queued[0].offset - 1, queued[0].epoch)
        if lost is not None and (lost.epoch != position.epoch or lost.offset > position.offset):
            log.warning("messages lost in a gap, members told", room=room.name,
                        since=position.offset, until=lost.offset, epoch=lost.epoch)
            rooms.announce_gap(room, lost)
        elif missed:
            log.info("gap refilled from history", room=room.name, since=position.offset,
                     messages=len(missed))
            rooms.count_gap("refilled")
        for publication in [*missed, *backlog]:
            rooms.deliver(publication)
        # Delivering the backlog may have found another gap and started the next refill: its
        # event is not this one's, and joins keep waiting for it.
        if room.refilled is refilled:
            room.refilled = None
        if refilled is not None:
            refilled.set()
