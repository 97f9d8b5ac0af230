"""Auto-pipelining: the Redis commands callers issue while a round trip is under way go to Redis
together, as the next pipeline, one pipeline at a time.

redis-py spends a few hundred microseconds of Python on each command it sends alone (a pooled
connection taken and given back, a timeout set, a retry wrapper, the reply read), several times
what Redis spends running it. A join storm issues two scripts per join (the position read of
history.lua and the entry of presence_add.lua) from hundreds of joins at once; sent as one
pipeline per round trip they cost that overhead once per batch. This is what ioredis'
``enableAutoPipelining`` and rueidis (Centrifugo's Redis client) do.

Each caller awaits its own reply, or its own error, as if it had sent the command alone. A
command queued by a caller that was cancelled before its batch left is not sent. The order of
commands is the order of the calls (one connection, one pipeline at a time), so that two calls
on one key run in the order they were made; a failed batch fails each of its commands, never a
later one. A NOSCRIPT reply (Redis lost its scripts: a restart, SCRIPT FLUSH) loads the scripts
and runs those commands again (``Batcher.rerunnable``; the broker's publish queue, where that
order matters across a batch, has its own rule).

On one Redis (and per shard with client-side sharding) a batcher has a connection of its own
(``_Wire``), outside the client's pool (it sends one pipeline at a time), and a batch is one
write of the packed commands and one read of their replies through hiredis, under
--redis-timeout, which starts again whenever data arrives (as redis-py times each read): about
7 us of the node's CPU per command, against about 40 through redis-py's Pipeline (its
per-command stack, response callbacks and per-reply reads), measured with 20 scripts per batch.
Its failure rules are the command client's (redis_common.connect): a connection Redis closed
while it was idle is replaced before the batch is written; a ConnectionError on a connection
that was already open (a socket left stale by a Redis restart) disconnects and sends the batch
once more on a fresh connection, except a written batch of the publish queue (``resend`` off:
Redis may have run it, and publishes run twice would be stored and delivered twice); a timeout
fails the batch (its commands may have run), never retried.

On a Redis Cluster the backends' batchers send each command alone (``Batcher.for_backend``):
redis-py's cluster pipeline neither retries a lost connection nor refreshes its slot map when a
command fails in place. The broker's publish queue pipelines there too (its own rules,
broker_redis._PublishQueue). A closed batcher fails what it holds, and every later call, with a
ConnectionError. Pub/sub connections never batch: they are not command connections
(redis_pubsub.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable
from typing import Any

import hiredis
import structlog
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from roomcast.backends.redis_common import REDIS_FAILURES, RedisHealth

log = structlog.get_logger("roomcast.redis")

#: Most commands in one pipeline; more wait for the next round trip. A constant: large enough
#: that a storm of joins needs few round trips, small enough that one pipeline's replies are a
#: few hundred KB at most and Redis runs it in a few milliseconds.
BATCH_LIMIT = 512


class Queued:
    """One command waiting: its arguments, the script it runs (for NOSCRIPT), a tag for
    subclasses' rules, and the caller's future."""

    __slots__ = ("command", "future", "packed", "script", "tag")

    def __init__(self, command: tuple[Any, ...], script: AsyncScript | None, tag: Any,
                 future: asyncio.Future[Any], packed: bytes = b"") -> None:
        self.command = command
        #: The command in RESP, for a batcher with a wire of its own (packed as it is called).
        self.packed = packed
        self.script = script
        self.tag = tag
        self.future = future


class Batcher:
    """One client's auto-pipeline (``transaction``: each batch a MULTI/EXEC)."""

    def __init__(self, client: Any, transaction: bool = False, limit: int = BATCH_LIMIT,
                 health: RedisHealth | None = None, pipelined: bool = True,
                 resend: bool = True) -> None:
        self.client = client
        #: Where errors in place are reported: the client's own RedisHealth by default.
        self._health = health if health is not None else getattr(client, "health", None)
        self._transaction = transaction
        self._limit = limit
        #: False: every command is sent alone, as redis-py would (see for_backend).
        self._pipelined = pipelined
        self._queue: list[Queued] = []
        self._sender: asyncio.Task[None] | None = None
        #: The context the batcher was made in (the node's, with its node_id bound), of which
        #: each sender runs in a copy.
        self._context = contextvars.copy_context()
        self._closed = False
        #: Its own connection, on one Redis (not a cluster, whose pipeline routes by slot);
        #: ``resend``: see _Wire.
        self._wire = (_Wire(client, resend) if pipelined and isinstance(client, Redis)
                      else None)

    @classmethod
    def for_backend(cls, client: Any) -> Batcher:
        """The batcher of a backend's hot commands: pipelined on one Redis; on a Redis Cluster
        each command alone. There a pipeline is split by node and, unlike a single command,
        neither retries a connection lost nor refreshes the slot map when it fails in place:
        after a failover, history and presence would keep failing until something else
        refreshed it."""
        return cls(client, pipelined=not isinstance(client, RedisCluster))

    @property
    def wired(self) -> bool:
        """True when batches go over the batcher's own connection: items carry their RESP."""
        return self._wire is not None

    def call(self, *command: Any, tag: Any = None) -> Awaitable[Any]:
        """Queue ``command`` (``"SADD", key, member``...); the future gets its reply."""
        if not self._pipelined:
            return self.client.execute_command(*command)  # type: ignore[no-any-return]
        return self._enqueue(command, None, tag)

    def script(self, script: AsyncScript, keys: list[str], args: list[Any],
               tag: Any = None) -> Awaitable[Any]:
        """Queue a run of ``script`` (EVALSHA; routed by its keys on a Redis Cluster)."""
        if not self._pipelined:
            return script(keys=keys, args=args)  # Loads the script itself on NOSCRIPT.
        return self._enqueue(("EVALSHA", script.sha, len(keys), *keys, *args), script, tag)

    def _enqueue(self, command: tuple[Any, ...], script: AsyncScript | None,
                 tag: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        packed = b""
        if self._wire is not None and not self._closed:
            try:
                packed = _pack(command)
            except DataError as exc:  # This caller's mistake: its own error, nothing sent.
                future.set_exception(exc)
                return future
        return self.push(Queued(command, script, tag, future, packed))

    def push(self, queued: Queued) -> asyncio.Future[Any]:
        """Queue ``queued`` (a subclass's own item; its future is the caller's) and start the
        sender if it is idle."""
        future = queued.future
        if self._closed:
            future.set_exception(_closed())
            return future
        self._queue.append(queued)
        if self._sender is None or self._sender.done():
            # The sender serves every caller: its log lines carry none of theirs (conn_id),
            # only what was bound where the batcher was made (the node's node_id).
            self._sender = asyncio.create_task(self._send(), name="redis-batcher",
                                               context=self._context.copy())
        return future

    async def close(self) -> None:
        """Stop sending: what is queued, in flight or called later fails with a
        ConnectionError (a Redis failure: 'unavailable', or retried where a caller retries)."""
        self._closed = True
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        self._fail(self._queue)  # Also if the sender was cancelled before its first step.
        if self._wire is not None:
            await self._wire.close()

    @staticmethod
    def _fail(queued: list[Queued]) -> None:
        for item in queued:
            if not item.future.done():
                item.future.set_exception(_closed())
        queued.clear()

    async def _send(self) -> None:
        queue = self._queue
        while queue:
            batch = [queued for queued in queue[:self._limit] if not queued.future.done()]
            del queue[:self._limit]
            if not batch:
                continue
            try:
                replies = await self.run(batch)
            except asyncio.CancelledError:
                self._fail(batch)
                self._fail(queue)
                raise
            except Exception as exc:  # Task boundary: each command gets the failure.
                if not isinstance(exc, REDIS_FAILURES):
                    log.error("redis batcher crashed", exc_info=True)
                replies = [exc] * len(batch)
            for queued, reply in zip(batch, replies, strict=True):
                if queued.future.done():
                    continue  # Its caller was cancelled meanwhile.
                if isinstance(reply, BaseException):
                    queued.future.set_exception(reply)
                else:
                    queued.future.set_result(reply)

    async def run(self, batch: list[Queued]) -> list[Any]:
        """The batch's replies (or errors), in order; the commands ``rerunnable`` names run
        again once their scripts are loaded. If that fails, it fails those commands alone:
        the others ran."""
        replies = await self.pipeline(batch)
        which = self.rerunnable(batch, replies)
        if which:
            try:
                scripts = {id(batch[i].script): batch[i].script for i in which}
                for script in scripts.values():
                    assert script is not None
                    await self.client.script_load(script.script)
                again = await self.pipeline([batch[i] for i in which])
            except REDIS_FAILURES as exc:
                again = [exc] * len(which)
            for i, reply in zip(which, again, strict=True):
                replies[i] = reply
        return replies

    def rerunnable(self, batch: list[Queued], replies: list[Any]) -> list[int]:
        """Indexes of the commands to run again after loading their scripts: every script
        Redis did not have. Inside one pipeline nothing here depends on their order."""
        return [i for i, reply in enumerate(replies)
                if isinstance(reply, NoScriptError) and batch[i].script is not None]

    async def pipeline(self, batch: list[Queued]) -> list[Any]:
        """Send ``batch`` as one pipeline; errors in place are reported to the client's
        RedisHealth as a command of their own would be."""
        replies: list[Any]
        if self._wire is not None:
            try:
                replies = await self._wire.run(batch, self._transaction)
            except REDIS_FAILURES as exc:
                if self._health is not None:
                    self._health.failed(exc, "MULTI" if self._transaction else "PIPELINE")
                raise
        else:
            pipe = self.client.pipeline(transaction=self._transaction)
            for queued in batch:
                pipe.execute_command(*queued.command)
            replies = await pipe.execute(raise_on_error=False)
        if self._health is not None:
            for queued, reply in zip(batch, replies, strict=True):
                if isinstance(reply, RedisError):
                    self._health.failed(reply, str(queued.command[0]))
        return replies


class _Wire:
    """A batcher's own connection to one Redis: a batch is one write and one read.

    The connection is redis-py's (made by the client's pool with its settings, so connecting,
    AUTH, the client name and the idle health check are the library's); the batch is written
    to its stream and the replies taken from its hiredis reader as they come, the errors among
    them in place (NOSCRIPT as NoScriptError). Uses internals of redis-py's connection (its
    stream writer) and hiredis parser (its reader and read_from_socket), pinned with the
    library's minor version (pyproject.toml).
    """

    def __init__(self, client: Redis, resend: bool = True) -> None:
        self._pool = client.connection_pool
        self._conn: AbstractConnection | None = None
        #: False: a batch that may have reached Redis is never sent again (the publish queue:
        #: a publish that ran and is sent again is stored and delivered twice).
        self._resend = resend
        #: Whether the batch being exchanged was written (it may have reached Redis).
        self._written = False

    async def run(self, batch: list[Queued], transaction: bool) -> list[Any]:
        """The replies of ``batch`` (in a MULTI/EXEC when ``transaction``), errors in place.

        A connection Redis closed while it was idle (a restart) is replaced before anything is
        written to it. A ConnectionError on a connection that was open from before (left stale
        by a restart the node has not seen yet) sends the batch once more on a fresh one, as
        the command client retries, unless the batch was written and ``resend`` is off: then
        Redis may have run it, and the error is raised. Any other failure, and one on a fresh
        connection (whose connect has retried already), is raised."""
        count = len(batch)
        payload = b"".join(queued.packed for queued in batch)
        if transaction:
            payload = _MULTI + payload + _EXEC
        while True:
            if self._conn is None:
                self._conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            conn = self._conn
            if conn.is_connected and _closed_by_peer(conn):
                await conn.disconnect(nowait=True)  # Nothing sent: a fresh one, no retry spent.
            stale = conn.is_connected
            self._written = False
            try:
                replies = await self._exchange(conn, payload, count + 2 if transaction else count)
            except BaseException as exc:
                # Whatever was left unread makes the connection useless: a fresh one next time.
                self._conn = None
                await conn.disconnect(nowait=True)
                if (stale and isinstance(exc, RedisConnectionError)
                        and (self._resend or not self._written)):
                    continue
                raise
            return _unwrap(replies, count) if transaction else replies

    async def _exchange(self, conn: AbstractConnection, payload: bytes, count: int) -> list[Any]:
        if not conn.is_connected:
            await conn.connect()  # type: ignore[no-untyped-call]
        # A PING first when it was idle past the interval (redis-py's rule).
        await conn.check_health()  # type: ignore[no-untyped-call]
        parser, writer = conn._parser, conn._writer
        if not isinstance(parser, _AsyncHiredisParser) or parser._reader is None or not writer:
            raise RedisConnectionError("the batcher needs redis-py's hiredis parser")
        reader = parser._reader
        replies: list[Any] = []
        loop = asyncio.get_running_loop()
        wait = conn.socket_timeout
        try:
            # --redis-timeout for the write, then again for each read that brings data: a long
            # batch that keeps arriving is not cut, as redis-py times each read.
            async with asyncio.timeout(wait) as deadline:
                self._written = True
                writer.write(payload)
                await writer.drain()
                while len(replies) < count:
                    reply = reader.gets()
                    if reply is NOT_ENOUGH_DATA:
                        await parser.read_from_socket()
                        if wait:
                            deadline.reschedule(loop.time() + wait)
                        continue
                    if _PUSH is not None and isinstance(reply, _PUSH):
                        continue  # RESP3 out-of-band (tracking, maintenance): not a reply.
                    if isinstance(reply, RedisConnectionError):  # LOADING, say: as redis-py.
                        raise reply
                    replies.append(reply)
        except TimeoutError:
            raise RedisTimeoutError("Timeout talking to Redis") from None
        except OSError as exc:
            raise RedisConnectionError(f"Error talking to Redis: {exc}") from exc
        if conn.health_check_interval:  # It answered: no PING needed for another interval.
            conn.next_health_check = loop.time() + conn.health_check_interval
        return replies

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)


#: Server pushes (RESP3) as hiredis gives them, where it does (hiredis 3.2 on).
_PUSH: type | None = getattr(hiredis, "PushNotification", None)
_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"
#: What a command's arguments may be (redis-py's Encoder: bool is refused, though an int).
_SENDABLE = (bytes, memoryview, str, int, float)


def _pack(command: tuple[Any, ...]) -> bytes:
    """``command`` in RESP; the argument types redis-py's encoder takes (str as UTF-8), and
    its DataError for the others (a bool, None)."""
    return b"*%d\r\n" % len(command) + pack_args(command)


def pack_args(args: tuple[Any, ...]) -> bytes:
    """``args`` as the bulk strings of a RESP command, without the array header that counts
    them (so that a subclass can join the arguments of several calls under one header)."""
    out = []
    for arg in args:
        kind = type(arg)  # The usual types first, by identity: this runs for every argument.
        if kind is str:
            arg = arg.encode()
        elif kind is int:
            arg = b"%d" % arg
        elif kind is not bytes:
            arg = _encode(arg)
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def _encode(arg: Any) -> bytes | memoryview:
    """An argument of a less usual type (a subclass, a float, a memoryview) as redis-py's
    encoder would send it."""
    if isinstance(arg, bool) or not isinstance(arg, _SENDABLE):
        raise DataError(f"Invalid input of type: '{type(arg).__name__}'. Convert to a "
                        "bytes, string, int or float first.")
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    return arg


def _unwrap(replies: list[Any], count: int) -> list[Any]:
    """The ``count`` replies of a MULTI/EXEC from the raw ones (OK, a QUEUED per command, the
    EXEC's array). When a command was refused as it was queued, Redis ran none of them
    (EXECABORT): that command gets its own error, the others the EXEC's. When MULTI itself
    was refused (an ACL), Redis ran each command at once: their own replies."""
    head, queued, done = replies[0], replies[1:-1], replies[-1]
    if isinstance(head, ResponseError):
        return queued
    if isinstance(done, list) and len(done) == count:
        return done
    failure = done if isinstance(done, BaseException) else ResponseError(
        f"EXEC returned {done!r}")
    return [reply if isinstance(reply, ResponseError) else failure for reply in queued]


def _closed_by_peer(conn: AbstractConnection) -> bool:
    """True when Redis closed ``conn`` (its stream reader saw the end): a connection that
    cannot have received anything since."""
    reader = getattr(conn, "_reader", None)
    return isinstance(reader, asyncio.StreamReader) and reader.at_eof()


def _closed() -> RedisConnectionError:
    return RedisConnectionError("redis client is closed")
