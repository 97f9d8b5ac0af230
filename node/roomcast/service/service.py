"""The use cases of a node, written once for every transport.

``Service`` joins, leaves, publishes, types, answers presence and history and disconnects users,
on behalf of a ``Connection`` with an ``Identity`` (service/connection.py). It knows nothing of
sockets, frames or dialects: a transport decodes a request, calls one method here and encodes
what it returns. A refusal is a ``ProtocolError`` with a code from ``ErrorCode`` (the transport
adds the request id); a backend that cannot be reached raises ``BrokerUnavailable``.

Presence repair: the node knows which users are connected here, so a user_left about one of
them is wrong (a peer reaped this node while it was paused, or the user came back just as the
leave went out). It is not shown to this node's members, and the user is announced again,
cluster-wide, with a user_joined once presence counts them again; this node's members, who saw
no leave, do not see that user_joined either (``_presence_event``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from roomcast import clock
from roomcast.backends import Backends
from roomcast.backends.broker import BrokerUnavailable, Publication
from roomcast.backends.history import HistoryResult
from roomcast.backends.presence import Member, nick_key
from roomcast.config import Config
from roomcast.metrics import Metrics
from roomcast.namespaces import Namespace, Namespaces, default_namespace
from roomcast.protocol import envelopes
from roomcast.protocol.closecodes import CloseCode
from roomcast.protocol.dialects import NATIVE, clean_nick
from roomcast.protocol.envelopes import ErrorCode, ProtocolError, Since
from roomcast.service import diffs, recovery
from roomcast.service.auth import TokenError, request_error
from roomcast.service.connection import Connection
from roomcast.service.permissions import Permissions
from roomcast.service.rooms import Room, Rooms

if TYPE_CHECKING:
    from roomcast.service.auth import Authenticator

log = structlog.get_logger("roomcast.service")

#: How every user_joined/user_left envelope begins (protocol.envelopes.event), to pick them out
#: of the ephemeral events without decoding the others (typing).
_USER_EVENT = b'{"type":"user_'
#: The tutorial's own sender name: no client may hold it as a nick (a message from "server"
#: would pass for the server's).
RESERVED_NICKS = frozenset({"server"})


@dataclass(frozen=True, slots=True)
class Joined:
    """The outcome of a join. ``position`` is set for joins that read the room's position
    (native clients); ``fresh`` is True when the user was not present before (user_joined)."""

    room: str
    fresh: bool = False
    position: HistoryResult | None = None
    already: bool = False


class Service:
    def __init__(
        self, config: Config, backends: Backends, rooms: Rooms, metrics: Metrics,
        namespaces: Namespaces | None = None, auth: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.namespaces = namespaces or Namespaces(default_namespace(config))
        self.permissions = Permissions(self.namespaces)
        #: Verifies room tokens; None: none are accepted (no keys configured).
        self.auth = auth
        self.node_id = config.node_id
        self.broker = backends.broker
        self.history_store = backends.history
        self.presence_store = backends.presence
        self.rooms = rooms
        self.metrics = metrics
        #: Every open connection of this node, by conn_id.
        self.connections: dict[str, Connection] = {}
        #: (room, user_id) -> this node's connections of the user joined to the room.
        self._local_users: dict[tuple[str, str], int] = {}
        #: Users this node announced again (user_joined) whose announcement it has not received
        #: back yet: a user_left that arrives before it was published before it, and needs no
        #: second announcement.
        self._rejoining: set[tuple[str, str]] = set()
        #: The origin of those announcements, so that this node knows its own.
        self._rejoin_origin = f"rejoin:{self.node_id}"
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Connections counted towards their user's cluster-wide limit (to uncount them).
        self._counted: set[str] = set()
        #: conn_id -> room -> when a typing event of it was last relayed (--typing-interval);
        #: at most --max-rooms-per-connection rooms per connection, dropped with it.
        self._typed: dict[str, dict[str, float]] = {}
        rooms.on_gap = self._gap
        #: Large rooms' presence events, coalesced (--presence-diff-above, service/diffs.py).
        self.diffs = diffs.PresenceDiffs(rooms, config.presence_diff_above,
                                         config.presence_diff_interval)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the backends; a Redis that is not reachable yet is waited for, briefly."""
        await self.broker.start(self._deliver, self._resubscribed, self.control)
        if not await self.broker.wait_connected(self.config.redis_timeout):
            log.warning("starting without redis; publishes fail until it is reachable")
        await self.presence_store.start(self.user_left, self.user_back)

    async def close(self) -> None:
        """Release the backends (presence removes this node's entries first). Idempotent."""
        for task in list(self._tasks):
            task.cancel()
        await self.rooms.close()
        await self.presence_store.close()
        await self.history_store.close()
        await self.broker.close()

    def _resubscribed(self, rooms: Any) -> None:
        self.metrics.resubscribes.inc()
        recovery.catch_up(self.rooms, self.history_store, rooms)

    def _gap(self, room: Room, publication: Publication) -> None:
        recovery.begin_refill(self.rooms, self.history_store, room, publication)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- presence events and their repair ------------------------------------------------------

    def _deliver(self, publication: Publication) -> None:
        """The broker's callback: every publication goes to the room's local members, but for
        the presence events this node knows to be wrong here (``_presence_event``)."""
        if publication.offset == 0 and publication.payload.startswith(_USER_EVENT):
            event: dict[str, Any] = orjson.loads(publication.payload)
            if not self._presence_event(publication, event) or self.diffs.take(
                    publication, event):
                return
        self.rooms.deliver(publication)

    def _presence_event(self, publication: Publication, event: dict[str, Any]) -> bool:
        """False for a user_joined/user_left this node's members must not see: a user_left about
        a user connected here (its repair starts), or this node's own re-announcement."""
        key = (publication.room, str(event.get("user_id", "")))
        if event.get("type") == "user_joined" and publication.origin == self._rejoin_origin:
            self._rejoining.discard(key)  # Every member elsewhere has it now, after the leave.
            return False
        if event.get("type") != "user_left" or key not in self._local_users:
            return True
        self.metrics.presence_left_suppressed.inc()
        if key not in self._rejoining:
            # Published after our last re-announcement, if any: the cluster counts the user
            # gone now, so write the entries back and say so again.
            log.warning("user_left about a user connected here; announcing the user again",
                        room=publication.room, user_id=key[1])
            self._rejoining.add(key)
            self._spawn(self._reannounce(publication.room, key[1],
                                         str(event.get("username", ""))))
        return False

    async def user_back(self, room: str, user_id: str, username: str) -> None:
        """Presence counts a user connected here again after the cluster had lost them (this
        node was reaped, or Redis lost its data): announce them again, unless that is under way
        or the user has left meanwhile."""
        key = (room, user_id)
        if key in self._rejoining or key not in self._local_users:
            return
        self._rejoining.add(key)
        await self._announce_back(room, user_id, username)

    async def _reannounce(self, room: str, user_id: str, username: str) -> None:
        try:
            await self.presence_store.restore(room, user_id)
        except Exception:
            log.warning("could not restore presence", room=room, exc_info=True)
            self._rejoining.discard((room, user_id))
            return
        await self._announce_back(room, user_id, username)

    async def _announce_back(self, room: str, user_id: str, username: str) -> None:
        """user_joined for a user announced gone while connected here, on every node; this
        node's members never saw the leave, so it comes from an origin this node drops. Not in
        a namespace with join/leave events off."""
        ns = self.namespaces.resolve(room)
        if ns is not None and not ns.join_leave:
            self._rejoining.discard((room, user_id))
            return
        try:
            await self.broker.publish_event(
                room, envelopes.event("user_joined", room, user_id=user_id, username=username,
                                      ts=clock.now_ms()),
                origin=self._rejoin_origin)
        except Exception:
            log.warning("could not announce user_joined again", room=room, exc_info=True)
            self._rejoining.discard((room, user_id))
            return
        self.metrics.presence_reannounced.inc()

    def _count_local(self, room: str, user_id: str, delta: int) -> None:
        key = (room, user_id)
        count = self._local_users.get(key, 0) + delta
        if count > 0:
            self._local_users[key] = count
        else:
            self._local_users.pop(key, None)
            self._rejoining.discard(key)

    # --- connections -------------------------------------------------------------------------

    def connected(self, conn: Connection) -> None:
        self.connections[conn.conn_id] = conn
        self.presence_store.set_connection_count(len(self.connections))

    async def count_user(self, conn: Connection) -> bool:
        """Count ``conn`` towards its user's connections across the cluster; False when the
        user already holds --max-connections-per-user (the transport refuses it, 4503).

        Anonymous connections are not counted (each is a user of its own). While Redis is
        unreachable the limit is not enforced: connecting stays possible, as it is for a
        node without the limit, and the outage is logged.
        """
        limit = self.config.max_connections_per_user
        who = conn.identity
        if not limit or not who.authenticated or not who.reclaims:
            return True  # No identity of its own (anonymous, the tutorial): nothing to count.
        try:
            admitted = await self.presence_store.open_connection(
                conn.identity.user_id, conn.conn_id, limit)
        except BrokerUnavailable:
            log.warning("per-user connection limit not checked: backend unavailable")
            return True
        if admitted:
            self._counted.add(conn.conn_id)
        return admitted

    async def disconnected(self, conn: Connection) -> None:
        """The connection is gone: leave every room it was in (presence, nicks, subscriptions)."""
        self.connections.pop(conn.conn_id, None)
        self._typed.pop(conn.conn_id, None)
        self.presence_store.set_connection_count(len(self.connections))
        for room in list(conn.rooms):
            try:
                await self._leave(conn, room)
            except Exception:
                log.warning("presence cleanup failed", room=room, exc_info=True)
        if conn.conn_id in self._counted:
            self._counted.discard(conn.conn_id)
            await self.presence_store.close_connection(conn.identity.user_id, conn.conn_id)

    def control(self, payload: bytes) -> None:
        """The broker's control callback: a cluster-wide action of the server API
        (service/server.py), applied to this node's connections."""
        try:
            action = orjson.loads(payload)
            op, user = action["op"], str(action["user"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("dropped a control message that is not roomcast's")
            return
        if op == "disconnect":
            self.disconnect_user(user, int(action.get("code", CloseCode.DISCONNECTED)),
                                 str(action.get("reason", "disconnected")))
        elif op == "unsubscribe":
            self._spawn(self.unsubscribe_user(user, str(action.get("room", ""))))

    async def unsubscribe_user(self, user_id: str, room: str) -> int:
        """Take this node's connections of ``user_id`` out of ``room``: a native one is told
        (left, reason unsubscribed), a chat-dialect one, whose only room it is, is closed with
        4500. Returns how many."""
        conns = [c for c in self.connections.values()
                 if c.identity.user_id == user_id and room in c.rooms]
        for conn in conns:
            await self._leave(conn, room)
            if conn.codec == NATIVE:
                conn.send(envelopes.revoked(room, "unsubscribed"))
            else:
                conn.close(CloseCode.DISCONNECTED, "unsubscribed")
        if conns:
            log.info("unsubscribed user", user_id=user_id, room=room, connections=len(conns))
        return len(conns)

    def disconnect_user(self, user_id: str, code: int = CloseCode.DISCONNECTED,
                        reason: str = "disconnected") -> int:
        """Close every connection of ``user_id`` on this node; returns how many."""
        conns = [c for c in self.connections.values() if c.identity.user_id == user_id]
        for conn in conns:
            conn.close(code, reason)
        if conns:
            log.info("disconnected user", user_id=user_id, connections=len(conns), code=code)
        return len(conns)

    # --- rooms -------------------------------------------------------------------------------

    def _member(self, conn: Connection, nick: str | None = None) -> Member:
        who = conn.identity
        return Member(who.user_id, who.username, self.node_id, conn.conn_id, clock.now_ms(), nick,
                      who.info)

    def namespace(self, room: str) -> Namespace:
        """The room's namespace (ProtocolError unknown_namespace)."""
        return self.permissions.namespace(room)

    async def join(
        self,
        conn: Connection,
        room: str,
        *,
        nick: str | None = None,
        since: Since | None = None,
        with_position: bool = True,
        reply: Callable[[Joined], None] | None = None,
        token: str | None = None,
    ) -> Joined:
        """Join ``conn`` to ``room``; ``nick`` reserves a room-unique nickname; ``token`` is a
        room token granting the room (permissions.py).

        With ``with_position`` (native clients) the room's position is read and, with
        ``since``, the missed messages replayed: ``reply`` is called with the outcome just
        before the replay, so that the transport's answer precedes it (recovery.py). In a
        namespace with recovery off, ``since`` is not served: the reply says recovered false.
        Raises ProtocolError unknown_namespace / forbidden / unauthorized / token_expired /
        room_full / too_many_rooms / nick_taken, or BrokerUnavailable; nothing stays joined
        after a failure, and a refused connection learns nothing of the room.
        """
        if room in conn.rooms:
            joined = Joined(room, already=True)
            if reply is not None:
                reply(joined)
            return joined
        if token is not None:
            await self._grant_room(conn, room, token)
        ns = self.permissions.check(conn, room, "join")
        limit = self.config.max_rooms_per_connection
        if len(conn.rooms) >= limit:
            raise ProtocolError(ErrorCode.TOO_MANY_ROOMS, f"at most {limit} rooms per connection")
        if ns.max_members:
            await self._check_room_size(conn, room, ns.max_members)
        if nick is not None:
            nick = clean_nick(nick, self.config.max_nick_length) or None
        if nick is not None:
            await self._claim_nick(conn, room, nick, ns)
        conn.rooms[room] = nick
        self._count_local(room, conn.identity.user_id, 1)
        fresh = False

        async def enter() -> None:
            nonlocal fresh
            fresh = await self._enter(conn, room, nick, ns)

        unrecovered = since is not None and not ns.recovery
        if unrecovered:
            since = None  # Recovery is off here: say so (recovered false), replay nothing.
        try:
            if with_position:
                def answer(result: HistoryResult) -> None:
                    if unrecovered:
                        result = dataclasses.replace(result, recovered=False)
                    if reply is not None:
                        reply(Joined(room, fresh, result))

                position = await recovery.join_with_replay(
                    self.rooms, self.history_store, conn, room, since, enter, answer)
                return Joined(room, fresh, position)
            await self.rooms.join(room, conn)
            await enter()
        except BaseException:
            await self._leave(conn, room)
            raise
        joined = Joined(room, fresh)
        if reply is not None:
            reply(joined)
        return joined

    async def _grant_room(self, conn: Connection, room: str, token: str) -> None:
        """Verify a room token for ``conn`` and ``room`` and remember what it grants."""
        if self.auth is None or not self.auth.enabled:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "room tokens need --auth jwt")
        try:
            claims = await self.auth.room(token, conn.identity.user_id, room)
        except TokenError as exc:
            raise self.token_refused(exc) from None
        conn.room_grants[room] = claims

    def token_refused(self, exc: TokenError) -> ProtocolError | BrokerUnavailable:
        """Count a refused token (roomcast_auth_failures_total) and return what the request
        fails with (auth.request_error)."""
        self.metrics.auth_failures.labels(reason=exc.reason).inc()
        return request_error(exc)

    async def _check_room_size(self, conn: Connection, room: str, limit: int) -> None:
        """ProtocolError room_full when ``limit`` other users are in the room. A user already
        present (another tab) always gets in. Two users joining at once on two nodes may both
        pass: the limit is exact per node, approximate across them."""
        if await self.presence_store.count(room) < limit:
            return
        user_id = conn.identity.user_id
        if (room, user_id) in self._local_users or any(
                m.user_id == user_id for m in await self.presence_store.members(room)):
            return
        raise ProtocolError(ErrorCode.ROOM_FULL, f"the room has its {limit} members")

    async def _claim_nick(self, conn: Connection, room: str, nick: str, ns: Namespace) -> None:
        if not ns.presence:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "nicks need presence, which is off in "
                                "this room's namespace")
        if nick_key(nick) in RESERVED_NICKS:
            raise ProtocolError(ErrorCode.NICK_TAKEN, f"the nick {nick!r} is reserved")
        owner = conn.identity.nick_owner(conn.conn_id)
        if not await self.presence_store.claim_nick(room, nick, self._member(conn, nick),
                                                    owner=owner):
            raise ProtocolError(ErrorCode.NICK_TAKEN, "that nick is in use in this room")

    async def _enter(self, conn: Connection, room: str, nick: str | None, ns: Namespace) -> bool:
        """Record presence and announce a newly present user; True when the user is new. In a
        namespace with presence off nothing is written; with join_leave off nothing is said."""
        if not ns.presence:
            return False
        fresh = await self.presence_store.add(room, self._member(conn, nick))
        if fresh and ns.join_leave:
            who = conn.identity
            fields: dict[str, Any] = {"user_id": who.user_id, "username": who.username,
                                      "ts": clock.now_ms()}
            if who.info is not None:
                fields["info"] = who.info
            await self.broker.publish_event(
                room, envelopes.event("user_joined", room, **fields), origin=conn.conn_id)
        return fresh

    async def recheck(self, conn: Connection) -> list[str]:
        """Leave every room ``conn`` may no longer join (its rights changed: a refresh with
        fewer grants, a room token that expired); returns those rooms."""
        lost = []
        for room in list(conn.rooms):
            try:
                self.permissions.check(conn, room, "join")
            except ProtocolError:
                lost.append(room)
                await self._leave(conn, room)
        return lost

    async def leave(self, conn: Connection, room: str) -> None:
        """Leave a joined room; ProtocolError not_joined otherwise."""
        if room not in conn.rooms:
            raise ProtocolError(ErrorCode.NOT_JOINED, "not in this room")
        await self._leave(conn, room)

    async def _leave(self, conn: Connection, room: str) -> None:
        if room in conn.rooms:
            self._count_local(room, conn.identity.user_id, -1)
        nick = conn.rooms.pop(room, None)
        self.rooms.leave(room, conn)
        ns = self.namespaces.resolve(room)
        if ns is None or ns.presence:
            await self.presence_store.remove(room, self._member(conn, nick))

    async def user_left(self, room: str, user_id: str, username: str) -> None:
        """Presence decided the user is gone: tell the room on every node (unless its
        namespace has join/leave events off)."""
        ns = self.namespaces.resolve(room)
        if ns is not None and not ns.join_leave:
            return
        try:
            await self.broker.publish_event(
                room, envelopes.event("user_left", room, user_id=user_id, username=username,
                                      ts=clock.now_ms()))
        except Exception:
            log.warning("could not announce user_left", room=room, exc_info=True)

    # --- messages ----------------------------------------------------------------------------

    async def publish(self, conn: Connection, room: str, data: Any) -> Publication:
        """Store and publish ``data`` from ``conn``'s identity; returns it with its offset.
        Raises ProtocolError forbidden / unknown_namespace where ``conn`` may not publish."""
        self.permissions.check(conn, room, "publish")
        who = conn.identity
        prefix = envelopes.message_prefix(
            room, data, envelopes.sender(who.user_id, who.username), clock.now_ms())
        publication = await self.broker.publish(room, prefix, conn.conn_id)
        self.metrics.publications.inc()
        return publication

    async def typing(self, conn: Connection, room: str) -> None:
        """Tell the room's other members that ``conn``'s user is typing (not stored), at most
        once per --typing-interval per connection and room: the others are dropped, silently
        (a browser sends one per keystroke). Needs the right to publish."""
        self.permissions.check(conn, room, "publish")
        typed = self._typed.setdefault(conn.conn_id, {})
        now = clock.monotonic()
        last = typed.get(room)
        if last is not None and now - last < self.config.typing_interval:
            self.metrics.typing_dropped.inc()
            return
        typed.pop(room, None)
        typed[room] = now  # Newest last: the oldest room is forgotten first.
        if len(typed) > self.config.max_rooms_per_connection:
            del typed[next(iter(typed))]
        who = conn.identity
        await self.broker.publish_event(
            room,
            envelopes.event("typing", room, **{"from": envelopes.sender(who.user_id,
                                                                         who.username)}),
            origin=conn.conn_id,
        )

    async def presence(self, conn: Connection, room: str) -> list[Member]:
        """Every connection in the room, cluster-wide, oldest first; ProtocolError forbidden
        where ``conn`` may not see it."""
        self.permissions.check(conn, room, "presence")
        return await self.presence_store.members(room)

    async def members(self, room: str) -> list[Member]:
        """The room's presence for a client that has just joined it (the chat dialects'
        welcome): empty where the namespace has presence off."""
        ns = self.namespaces.resolve(room)
        if ns is not None and not ns.presence:
            return []
        return await self.presence_store.members(room)

    def public_presence(self, room: str) -> bool:
        """True when the room's presence may be shown to anyone, without a connection (the
        client port's REST endpoint): presence is on and its namespace lets anyone join, or
        --auth none, where every connection counts as authenticated anyway."""
        ns = self.namespaces.resolve(room)
        if ns is None or not ns.presence:
            return False
        return ns.join == "anyone" or (self.config.auth == "none" and ns.join != "granted")

    async def history(
        self, conn: Connection, room: str, since: Since | None = None, limit: int | None = None
    ) -> HistoryResult:
        """The room's stored messages; ProtocolError forbidden where ``conn`` may not read."""
        self.permissions.check(conn, room, "history")
        return await self.history_store.read(room, since, limit)

    def positions(self, conn: Connection) -> dict[str, dict[str, Any]]:
        """Each room's position ``conn`` has received up to (the drain hint)."""
        return recovery.delivered(self.rooms, conn)

    async def stats(self, public_only: bool = False) -> dict[str, Any]:
        """Connections and rooms of this node and the cluster. With ``public_only`` (an
        endpoint anyone may call), only the rooms whose presence is public are listed: the name
        and size of a room one may not join are not shown."""
        cluster = await self.presence_store.stats()
        local = self.rooms.local_counts()
        if public_only:
            local = {room: n for room, n in local.items() if self.public_presence(room)}
            cluster["rooms"] = {room: n for room, n in cluster.get("rooms", {}).items()
                                if self.public_presence(room)}
        return {"node_id": self.node_id, "connections": len(self.connections), "rooms": local,
                "cluster": cluster}
