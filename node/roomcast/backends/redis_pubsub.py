"""One Redis connection in subscribed mode, read in batches: the pub/sub reader of a node.

redis-py's ``PubSub.get_message`` parses and returns one message per call, each behind a timeout
context; at tens of thousands of publications per second that is most of a node's time, and,
worse, the fan-out cannot coalesce what it never sees together. ``Subscription`` reads whatever
the socket holds (up to READ_SIZE bytes), parses every complete reply in it with hiredis and
hands them all to the node before it yields to the event loop: the publications of one read are
delivered in one loop turn, so the frame writer (transports/writer.py) writes them to each member
in one ``write``.

The connection itself is redis-py's (``Connection.connect``: TCP, TLS or unix socket, AUTH,
SELECT, CLIENT SETNAME), taken over once its handshake is done: from then on it only ever sends
(S)SUBSCRIBE, (S)UNSUBSCRIBE and PING, and what comes back is parsed here. No retry and no
resubscribe happen inside: a lost connection ends ``run`` with an error, and the broker's loop
reconnects and refills from history what was published in between (recovery.py).

Liveness: ``last_seen`` is when anything last arrived; the broker PINGs an idle connection and
``abort``s one that stays silent (a half-open socket delivers nothing and fails nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

#: Bytes asked of the socket per read: large enough that a burst is parsed in one go.
READ_SIZE = 256 * 1024

#: ``on_message(kind, channel, data)`` for every ``message``/``smessage`` reply, in order.
OnMessage = Callable[[bytes, bytes, bytes], None]
#: ``on_confirm(kind, channel)`` for every (s)subscribe/(s)unsubscribe confirmation.
OnConfirm = Callable[[bytes, bytes], None]

_MESSAGES = frozenset({b"message", b"smessage"})
_CONFIRMS = frozenset({b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe"})


class Subscription:
    """A connected redis-py ``Connection`` read as a stream of pub/sub replies.

    Use: ``sub = await Subscription.open(connection, on_message, on_confirm)``, then send
    ``subscribe``/``ssubscribe`` and ``await sub.run()``, which returns only by raising (a
    RedisConnectionError when Redis closed the connection, sent an error reply or ``abort`` was
    called). ``close`` releases the connection; it is idempotent.
    """

    def __init__(self, connection: AbstractConnection, on_message: OnMessage,
                 on_confirm: OnConfirm) -> None:
        self._connection = connection
        self._on_message = on_message
        self._on_confirm = on_confirm
        # redis-py's own stream pair (AbstractConnection.connect): private, so pinned by the
        # redis version range in pyproject.toml and covered by every Redis test.
        self._reader: asyncio.StreamReader = connection._reader  # type: ignore[assignment]
        self._writer: asyncio.StreamWriter = connection._writer  # type: ignore[assignment]
        self._parser = hiredis.Reader()
        self._aborted: str | None = None
        self.last_seen = asyncio.get_running_loop().time()

    @classmethod
    async def open(cls, connection: AbstractConnection, on_message: OnMessage,
                   on_confirm: OnConfirm) -> Subscription:
        """Connect ``connection`` (its handshake included) and take it over."""
        await connection.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        return cls(connection, on_message, on_confirm)

    # --- commands: written at once, never awaited (confirmations come back through run) -------

    def _send(self, *args: Any) -> None:
        if self._aborted is None:
            self._writer.writelines(self._connection.pack_command(*args))

    def subscribe(self, *channels: str) -> None:
        if channels:
            self._send("SUBSCRIBE", *channels)

    def unsubscribe(self, *channels: str) -> None:
        if channels:
            self._send("UNSUBSCRIBE", *channels)

    def ssubscribe(self, *channels: str) -> None:
        """Sharded subscribe (Redis 7): every channel of one call must be in one slot."""
        if channels:
            self._send("SSUBSCRIBE", *channels)

    def sunsubscribe(self, *channels: str) -> None:
        if channels:
            self._send("SUNSUBSCRIBE", *channels)

    def ping(self) -> None:
        self._send("PING")

    # --- reading ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and dispatch replies until the connection fails; always raises."""
        loop = asyncio.get_running_loop()
        reader, parser = self._reader, self._parser
        on_message, on_confirm = self._on_message, self._on_confirm
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except OSError as exc:
                raise RedisConnectionError(f"redis pub/sub connection failed: {exc}") from exc
            if not data:
                raise RedisConnectionError(
                    self._aborted or "redis closed the pub/sub connection")
            self.last_seen = loop.time()
            parser.feed(data)
            # Every complete reply of this read, before the next await: one loop turn.
            while (reply := parser.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    # In subscribed mode an error is a refused (S)SUBSCRIBE: a slot that moved
                    # (MOVED), a cross-slot batch, an ACL. The subscriptions are no longer what
                    # the broker thinks: start over, and refill.
                    raise ResponseError(str(reply))
                kind = reply[0]
                if kind in _MESSAGES:
                    on_message(kind, reply[1], reply[2])
                elif kind in _CONFIRMS:
                    on_confirm(kind, reply[1])
                # pong: last_seen is all it is for.

    def abort(self, reason: str) -> None:
        """Drop the connection now: ``run`` raises RedisConnectionError(``reason``)."""
        if self._aborted is None:
            self._aborted = reason
            self._reader.feed_eof()
            self._writer.transport.abort()

    async def close(self) -> None:
        self._aborted = self._aborted or "closed"
        await self._connection.disconnect()
