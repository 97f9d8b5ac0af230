"""The service layer on its own: every use case on memory backends, with in-process connections
(no sockets), including the replay/live hand-over and the refill after a resubscribe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from roomcast.backends import Backends
from roomcast.backends.broker import BrokerUnavailable, MemoryBroker
from roomcast.backends.history import HistoryResult, MemoryHistory
from roomcast.backends.presence import MemoryPresence
from roomcast.config import Config
from roomcast.metrics import Metrics
from roomcast.protocol import dialects
from roomcast.protocol.closecodes import CloseCode
from roomcast.protocol.envelopes import ErrorCode, ProtocolError, Since
from roomcast.service import recovery
from roomcast.service.connection import Identity
from roomcast.service.rooms import Rooms
from roomcast.service.service import Joined, Service


@dataclass(eq=False)
class Conn:
    """An in-process Connection: what it was sent, and how it was closed."""

    conn_id: str
    identity: Identity
    codec: str = dialects.NATIVE
    rooms: dict[str, str | None] = field(default_factory=dict)
    room_grants: dict[str, Any] = field(default_factory=dict)
    sent: list[dict[str, Any]] = field(default_factory=list)
    closed: tuple[int, str] | None = None

    def send(self, payload: bytes) -> None:
        self.sent.append(orjson.loads(payload))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def messages(self) -> list[Any]:
        return [m["data"] for m in self.sent if m["type"] == "message"]


class DirectFanout:
    def joined(self, group: Any, conn: Any) -> None:
        pass

    def leaving(self, group: Any, conn: Any) -> None:
        pass

    def send(self, connections: Iterable[Any], payload: bytes, skip: str = "") -> int:
        targets = [c for c in connections if not (skip and c.conn_id == skip)]
        for conn in targets:
            conn.send(payload)
        return len(targets)


class Node:
    def __init__(self, **settings: Any) -> None:
        self.config = Config(node_id="n1", presence_grace=0.05, **settings)
        self.history = MemoryHistory(self.config.history_size, self.config.history_ttl)
        self.broker = MemoryBroker(self.history)
        self.presence = MemoryPresence("n1", self.config.presence_grace)
        metrics = Metrics()
        self.rooms = Rooms(self.broker, DirectFanout(), metrics, 0.0, dialects.ENCODERS)
        self.service = Service(self.config, Backends(self.broker, self.history, self.presence),
                               self.rooms, metrics)
        self._count = 0

    def conn(self, user: str) -> Conn:
        self._count += 1
        conn = Conn(f"c{self._count}", Identity(user, user.title()))
        self.service.connected(conn)
        return conn


async def started(history: MemoryHistory, broker: MemoryBroker) -> tuple[Service, Rooms]:
    """A started service of node n1 over this history and broker (memory presence)."""
    rooms = Rooms(broker, DirectFanout(), Metrics(), 0.0, dialects.ENCODERS)
    service = Service(Config(node_id="n1"), Backends(broker, history, MemoryPresence("n1", 0.05)),
                      rooms, Metrics())
    await service.start()
    return service, rooms


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node()
    await node.service.start()
    yield node
    await node.service.close()


async def test_publish_reaches_members_with_offsets_and_the_verified_sender(node: Node) -> None:
    """Every member gets each message once, in order, with offset, epoch and ``from``."""
    alice, bob = node.conn("alice"), node.conn("bob")
    for conn in (alice, bob):
        await node.service.join(conn, "r")
    for i in range(3):
        await node.service.publish(alice, "r", i)
    assert alice.messages() == bob.messages() == [0, 1, 2]
    last = bob.sent[-1]
    assert last["offset"] == 3 and last["from"] == {"user_id": "alice", "username": "Alice"}


async def test_join_replies_before_the_replay_and_the_replay_has_no_gap(node: Node) -> None:
    """join with since: the reply first, then exactly the missed messages, then live ones."""
    pub = node.conn("pub")
    acks = [await node.service.publish(pub, "r", i) for i in range(5)]
    sub = node.conn("sub")
    replies: list[Joined] = []

    def reply(joined: Joined) -> None:
        replies.append(joined)
        sub.send(b'{"type":"joined"}')

    await node.service.join(sub, "r", since=Since(2, acks[0].epoch), reply=reply)
    await node.service.publish(pub, "r", 5)
    assert [m["type"] for m in sub.sent] == ["joined", "message", "message", "message",
                                             "message"]
    assert sub.messages() == [2, 3, 4, 5]
    assert replies[0].position is not None and replies[0].position.recovered is True


class RacingHistory(MemoryHistory):
    """A history whose read lets another publication happen around it (before or after the
    position is taken), as a concurrent publisher on another node would."""

    def __init__(self, publish_before_read: bool) -> None:
        super().__init__()
        self.before = publish_before_read
        self.race: Any = None

    async def read(self, room: str, since: Since | None = None,
                   limit: int | None = None) -> HistoryResult:
        if self.race is not None and self.before:
            await self.race()
        result = await super().read(room, since, limit)
        if self.race is not None and not self.before:
            await self.race()
        return result


@pytest.mark.parametrize("publish_before_read", [True, False])
async def test_a_publication_racing_the_join_arrives_exactly_once(
    publish_before_read: bool,
) -> None:
    """Published while the joiner's history is read: in the replay or live, never both or none."""
    history = RacingHistory(publish_before_read)
    broker = MemoryBroker(history)
    service, _ = await started(history, broker)
    pub, sub = Conn("p", Identity("p", "P")), Conn("s", Identity("s", "S"))
    first = await service.publish(pub, "r", "before")

    async def race() -> None:
        history.race = None
        await service.publish(pub, "r", "racing")

    history.race = race
    await service.join(sub, "r", since=Since(first.offset, first.epoch))
    await service.publish(pub, "r", "after")
    assert sub.messages() == ["racing", "after"]
    await service.close()


async def test_refusals_are_protocol_errors_with_codes(node: Node) -> None:
    """too_many_rooms, nick_taken and not_joined are refusals; nothing stays joined."""
    small = Node(max_rooms_per_connection=1)
    await small.service.start()
    conn = small.conn("u")
    await small.service.join(conn, "a")
    with pytest.raises(ProtocolError) as refused:
        await small.service.join(conn, "b")
    assert refused.value.code == ErrorCode.TOO_MANY_ROOMS and list(conn.rooms) == ["a"]
    await small.service.close()

    holder, other = node.conn("holder"), node.conn("other")
    await node.service.join(holder, "r", nick="Zed")
    with pytest.raises(ProtocolError) as taken:
        await node.service.join(other, "r", nick="zed")
    assert taken.value.code == ErrorCode.NICK_TAKEN and other.rooms == {}
    with pytest.raises(ProtocolError) as not_joined:
        await node.service.leave(other, "r")
    assert not_joined.value.code == ErrorCode.NOT_JOINED
    again = await node.service.join(holder, "r")
    assert again.already is True


async def test_typing_reaches_the_others_only(node: Node) -> None:
    """A typing event goes to every member but the typist and is not stored."""
    alice, bob = node.conn("alice"), node.conn("bob")
    await node.service.join(alice, "r")
    await node.service.join(bob, "r")
    await node.service.typing(alice, "r")
    assert [m["type"] for m in bob.sent if m["type"] == "typing"] == ["typing"]
    assert not [m for m in alice.sent if m["type"] == "typing"]
    assert (await node.service.history(alice, "r")).offset == 0


async def test_presence_and_user_joined_are_per_user(node: Node) -> None:
    """presence lists every connection; user_joined goes out for a user's first one only."""
    watcher, tab1, tab2 = node.conn("watcher"), node.conn("carol"), node.conn("carol")
    await node.service.join(watcher, "r")
    fresh = [(await node.service.join(tab, "r")).fresh for tab in (tab1, tab2)]
    assert fresh == [True, False]
    assert [m["user_id"] for m in watcher.sent if m["type"] == "user_joined"] == ["carol"]
    members = await node.service.presence(watcher, "r")
    assert sorted(m.user_id for m in members) == ["carol", "carol", "watcher"]


async def test_disconnect_user_closes_only_that_users_connections(node: Node) -> None:
    """A kick closes each of the user's connections with 4500 and leaves the rest alone."""
    one, two, bystander = node.conn("mallory"), node.conn("mallory"), node.conn("bob")
    assert node.service.disconnect_user("mallory") == 2
    assert one.closed == two.closed == (CloseCode.DISCONNECTED, "disconnected")
    assert bystander.closed is None
    assert node.service.disconnect_user("nobody") == 0


async def test_a_failed_join_leaves_nothing_behind(node: Node) -> None:
    """With the backend gone, join raises BrokerUnavailable and the connection is in no room."""
    conn = node.conn("u")
    await node.broker.close()
    with pytest.raises(BrokerUnavailable):
        await node.service.join(conn, "r")
    assert conn.rooms == {}
    room = node.rooms.get("r")
    assert room is None or len(room) == 0


async def test_disconnected_leaves_every_room(node: Node) -> None:
    """A closed connection is removed from presence in each of its rooms."""
    conn = node.conn("u")
    await node.service.join(conn, "a")
    await node.service.join(conn, "b")
    await node.service.disconnected(conn)
    assert await node.service.members("a") == await node.service.members("b") == []
    assert conn.conn_id not in node.service.connections


async def test_refill_after_resubscribe_delivers_the_gap_before_newer_messages(
    node: Node,
) -> None:
    """Publications the node missed while unsubscribed come from history, in order, before a
    live one that arrived during the refill; none twice."""
    pub, sub = node.conn("pub"), node.conn("sub")
    await node.service.join(sub, "r")
    await node.service.publish(pub, "r", 1)
    await node.broker.unsubscribe("r")  # The subscription is lost...
    for i in (2, 3, 4):
        await node.service.publish(pub, "r", i)
    await node.broker.subscribe("r")  # ...and made again: the broker reports it.
    tasks = recovery.catch_up(node.rooms, node.history, ["r"])
    await node.service.publish(pub, "r", 5)  # Live, while the refill reads history.
    await asyncio.gather(*tasks)
    await node.service.publish(pub, "r", 6)
    assert sub.messages() == [1, 2, 3, 4, 5, 6]
    assert [m["offset"] for m in sub.sent if m["type"] == "message"] == [1, 2, 3, 4, 5, 6]


async def test_a_gap_history_cannot_serve_is_told_to_the_members() -> None:
    """When history no longer holds the gap, members get a gap event (recovered false, the
    position they jump to) before the next message; nothing twice, nothing silently missing."""
    node = Node(history_size=2)
    await node.service.start()
    pub, sub = node.conn("pub"), node.conn("sub")
    await node.service.join(sub, "r")
    await node.service.publish(pub, "r", 1)
    await node.broker.unsubscribe("r")
    for i in range(2, 7):
        await node.service.publish(pub, "r", i)
    await node.broker.subscribe("r")
    await asyncio.gather(*recovery.catch_up(node.rooms, node.history, ["r"]))
    await node.service.publish(pub, "r", 7)
    events = [(m["type"], m.get("data", m.get("offset"))) for m in sub.sent
              if m["type"] in ("message", "gap")]
    assert events == [("message", 1), ("gap", 6), ("message", 7)]
    gap = next(m for m in sub.sent if m["type"] == "gap")
    assert gap == {"type": "gap", "room": "r", "recovered": False, "offset": 6,
                   "epoch": sub.sent[-1]["epoch"]}
    await node.service.close()


async def test_a_skipped_offset_on_the_live_stream_is_refilled(node: Node) -> None:
    """A publication whose offset skips past the room's position (the node missed some while
    subscribed elsewhere, or Redis dropped them) is held until the missing ones come from
    history: members get every message once, in order, with no resubscribe report."""
    pub, sub = node.conn("pub"), node.conn("sub")
    await node.service.join(sub, "r")
    await node.service.publish(pub, "r", 1)
    await node.broker.unsubscribe("r")
    for i in (2, 3):
        await node.service.publish(pub, "r", i)
    await node.broker.subscribe("r")  # Silently: nobody reports this resubscribe.
    await node.service.publish(pub, "r", 4)  # Offset 4 after 1: a gap, seen on arrival.
    room = node.rooms.get("r")
    assert room is not None and room.refilled is not None
    await room.refilled.wait()
    await node.service.publish(pub, "r", 5)
    assert sub.messages() == [1, 2, 3, 4, 5]


async def test_a_new_epoch_that_skips_its_start_is_refilled_and_the_old_tail_told() -> None:
    """History lost and restarted (a new epoch) while this node missed its first messages: the
    members are told the old epoch may have lost messages, then get the new epoch from 1."""
    now = [0.0]
    history = MemoryHistory(100, 10.0, clock=lambda: now[0])
    broker = MemoryBroker(history)
    service, rooms = await started(history, broker)
    pub, sub = Conn("p", Identity("p", "P")), Conn("s", Identity("s", "S"))
    await service.join(sub, "r")
    old = await service.publish(pub, "r", "old")
    await broker.unsubscribe("r")
    now[0] = 60.0  # Past the TTL: the room's history is gone; a new epoch starts.
    for data in ("new1", "new2"):
        await service.publish(pub, "r", data)
    await broker.subscribe("r")
    await service.publish(pub, "r", "new3")
    room = rooms.get("r")
    assert room is not None and room.refilled is not None
    await room.refilled.wait()
    kinds = [(m["type"], m.get("data")) for m in sub.sent if m["type"] in ("message", "gap")]
    assert kinds == [("message", "old"), ("gap", None), ("message", "new1"),
                     ("message", "new2"), ("message", "new3")]
    gap = next(m for m in sub.sent if m["type"] == "gap")
    assert gap["offset"] == 0 and gap["epoch"] != old.epoch
    await service.close()


async def test_drain_positions_leave_out_rooms_still_replaying(node: Node) -> None:
    """The drain hint's position is what the connection has received, per room."""
    pub, sub = node.conn("pub"), node.conn("sub")
    await node.service.join(sub, "r")
    ack = await node.service.publish(pub, "r", "x")
    assert node.service.positions(sub) == {"r": {"offset": ack.offset, "epoch": ack.epoch}}
    room = node.rooms.get("r")
    assert room is not None
    room.pending[sub] = []  # As if it were rejoining with a replay in flight.
    assert node.service.positions(sub) == {}


class GatedHistory(MemoryHistory):
    """A history whose next read waits for ``gate``: a refill that is slow to come back."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None

    async def read(self, room: str, since: Since | None = None,
                   limit: int | None = None) -> HistoryResult:
        gate, self.gate = self.gate, None
        if gate is not None:
            await gate.wait()
        return await super().read(room, since, limit)


async def test_a_join_during_a_refill_gets_each_message_once() -> None:
    """A client joining with since while the room refills waits for the refill, then replays
    from a position past it: no message twice, none missing."""
    history = GatedHistory()
    broker = MemoryBroker(history)
    service, rooms = await started(history, broker)
    pub, old = Conn("p", Identity("p", "P")), Conn("o", Identity("o", "O"))
    new = Conn("n", Identity("n", "N"))
    await service.join(old, "r")
    first = await service.publish(pub, "r", 1)
    await broker.unsubscribe("r")
    for i in (2, 3, 4):
        await service.publish(pub, "r", i)
    await broker.subscribe("r")
    history.gate = gate = asyncio.Event()
    tasks = recovery.catch_up(rooms, history, ["r"])
    await asyncio.sleep(0)  # The refill starts and waits at the gate.
    joining = asyncio.ensure_future(service.join(new, "r", since=Since(first.offset,
                                                                        first.epoch)))
    await service.publish(pub, "r", 5)
    for _ in range(5):  # Let the join get as far as it can while the refill is held.
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks, joining)
    await service.publish(pub, "r", 6)
    assert old.messages() == [1, 2, 3, 4, 5, 6]
    assert new.messages() == [2, 3, 4, 5, 6]
    await service.close()


class LaggingBroker(MemoryBroker):
    """A broker whose live deliveries lag its history, as Redis pub/sub can lag the command
    connection: publications are stored at once and delivered on ``flush``."""

    def __init__(self, history: MemoryHistory) -> None:
        super().__init__(history)
        self.held: list[Any] = []
        self.lagging = False

    def _deliver(self, publication: Any) -> None:
        if self.lagging:
            self.held.append(publication)
        else:
            super()._deliver(publication)

    def flush(self) -> None:
        held, self.held, self.lagging = self.held, [], False
        for publication in held:
            super()._deliver(publication)


@pytest.mark.parametrize("with_since", [True, False])
async def test_a_join_whose_history_is_ahead_of_the_live_stream_gets_no_repeats(
    with_since: bool,
) -> None:
    """History read on one connection can be ahead of the pub/sub stream: the live copies of
    what a joiner's hand-over covered reach every other member once and the joiner not again;
    a member that joined earlier without a position (a compatibility client) loses nothing."""
    history = MemoryHistory()
    broker = LaggingBroker(history)
    service, _ = await started(history, broker)
    pub, early = Conn("p", Identity("p", "P")), Conn("e", Identity("e", "E"))
    await service.join(early, "r", with_position=False)
    first = await service.publish(pub, "r", 1)
    broker.lagging = True
    for data in (2, 3):
        await service.publish(pub, "r", data)
    late = Conn("l", Identity("l", "L"))
    joined = await service.join(late, "r", since=Since(first.offset, first.epoch)
                                if with_since else None)
    assert joined.position is not None and joined.position.offset == 3
    broker.flush()  # The live copies of 2 and 3 arrive now.
    await service.publish(pub, "r", 4)
    assert early.messages() == [1, 2, 3, 4]
    assert late.messages() == ([2, 3, 4] if with_since else [4])
    await service.close()


async def test_typing_state_is_dropped_with_the_connection(node: Node) -> None:
    """The typing throttle's state of a connection goes when it does, whichever rooms it typed
    in (joined or not), and holds at most --max-rooms-per-connection rooms meanwhile."""
    conn = node.conn("typist")
    for n in range(node.config.max_rooms_per_connection + 5):
        await node.service.typing(conn, f"room{n}")
    assert len(node.service._typed[conn.conn_id]) == node.config.max_rooms_per_connection
    await node.service.disconnected(conn)
    assert conn.conn_id not in node.service._typed
