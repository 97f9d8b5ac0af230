"""Who may do what in a room: the namespace's rules, widened by what tokens grant.

One check per action, written once for every transport (habit 16). The rules
(docs/PROTOCOL.md, "Namespaces and permissions"):

* ``join``: the namespace's join rule -- ``anyone``; ``authenticated`` (every connection but an
  anonymous one); ``granted`` (only with a grant). A grant of ``join`` admits under any rule.
* ``publish`` (and typing): ``members`` -- every connection that may join the room (it need not
  have joined, as before namespaces); ``granted``; ``server`` -- no client at all, grant or not:
  only the server API publishes there.
* ``presence``: nobody when the namespace has presence off; else whoever may join, or a grant
  of ``presence``. ``history``: whoever may join, or a grant of ``history``.

A grant is an entry of the connection token's ``rooms`` claim whose pattern matches the room,
or a room token the connection presented when it joined (``Connection.room_grants``) and whose
``exp`` has not passed.
"""

from __future__ import annotations

import time

from roomcast.namespaces import Namespace, Namespaces
from roomcast.protocol.envelopes import ErrorCode, ProtocolError
from roomcast.service.connection import Connection


def granted(conn: Connection, room: str, action: str) -> bool:
    """True when a token of ``conn`` grants ``action`` in ``room``."""
    token = conn.room_grants.get(room)
    if token is not None and action in token.actions and token.expires_at > time.time():
        return True
    return any(grant.allows(room, action) for grant in conn.identity.grants)


class Permissions:
    def __init__(self, namespaces: Namespaces) -> None:
        self.namespaces = namespaces

    def namespace(self, room: str) -> Namespace:
        """The room's namespace; ProtocolError unknown_namespace when it has none."""
        ns = self.namespaces.resolve(room)
        if ns is None:
            prefix = room.partition(":")[0]
            raise ProtocolError(ErrorCode.UNKNOWN_NAMESPACE, f"no namespace {prefix!r}")
        return ns

    def may_join(self, conn: Connection, room: str, ns: Namespace) -> bool:
        if granted(conn, room, "join"):
            return True
        if ns.join == "anyone":
            return True
        return ns.join == "authenticated" and conn.identity.authenticated

    def check(self, conn: Connection, room: str, action: str) -> Namespace:
        """The room's namespace when ``conn`` may do ``action`` there; otherwise ProtocolError
        unknown_namespace or forbidden (its message names the action, never the room's
        content)."""
        ns = self.namespace(room)
        if action == "join":
            allowed = self.may_join(conn, room, ns)
        elif action == "publish":
            allowed = ns.publish != "server" and (
                granted(conn, room, "publish")
                or (ns.publish == "members" and self.may_join(conn, room, ns)))
        elif action == "presence":
            if not ns.presence:
                raise ProtocolError(ErrorCode.FORBIDDEN,
                                    "presence is off in this room's namespace")
            allowed = granted(conn, room, "presence") or self.may_join(conn, room, ns)
        else:
            allowed = granted(conn, room, action) or self.may_join(conn, room, ns)
        if not allowed:
            raise ProtocolError(ErrorCode.FORBIDDEN, f"not allowed to {action} in this room")
        return ns
