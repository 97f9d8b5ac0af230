"""The canary: one publisher and raw subscribers on every node, and the accounting of every
acknowledged message.

The publisher speaks the native protocol on one connection, publishes ``{"seq": n, "pad": ...}``
with ``id`` n at a fixed rate and records every ``published`` ack (seq, offset, epoch) and every
refusal. A node serves one connection's frames in order, so seq order is offset order.

Subscribers are raw WebSocket clients, not ``roomcast.tools.client.Client``: that client drops a
message at or below its position, which would hide a duplicate the server sent. Each one does
what a real client does (reconnect with backoff over its list of node URLs, rejoin with
``since`` = the last message it received) and records every frame as it came: messages, the
explicit "you lost something" signals (a ``gap`` event, a ``joined`` with ``recovered: false``)
and its closes.

``account`` is pure: it compares one subscriber's record with the publisher's acks. The rule:
an acknowledged message is *lost* unless the subscriber received it or was told (gap or
recovered:false) about a position that covers it; a second copy is a *duplicate*; a message
arriving after one published later is *reordered*; a message whose offset or epoch differs from
its ack is *wrong*. Refused publishes were not acknowledged and count for nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

#: Bounds on every network wait of the canary, in seconds.
CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 10.0
#: Reconnect backoff of the subscribers and the publisher: full jitter, doubling, capped.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 1.0
#: A join refused (``unavailable`` while Redis is away) is sent again after this long.
REJOIN_DELAY = 0.3


def now() -> float:
    """The one clock of the suite (monotonic seconds): faults, acks and receipts use it."""
    return time.monotonic()


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """A publication the node acknowledged: the canary's seq and the offset/epoch it got."""

    seq: int
    offset: int
    epoch: str
    at: float
    #: When the publish was sent (``at`` is when its ack came back).
    sent: float = 0.0


@dataclass(frozen=True, slots=True)
class Received:
    """A canary message as one subscriber received it (live or replayed)."""

    seq: int
    offset: int
    epoch: str
    at: float


@dataclass(frozen=True, slots=True)
class Told:
    """An explicit "messages up to (offset, epoch) may never reach you": ``kind`` is ``gap``
    (the event) or ``recovered_false`` (a ``joined`` reply to a join with ``since``)."""

    kind: str
    offset: int
    epoch: str
    at: float


# --- accounting (pure) ---------------------------------------------------------------------


@dataclass(slots=True)
class SubscriberResult:
    """One subscriber's accounting against the publisher's acks."""

    name: str
    node: str
    acked: int
    received_once: int
    lost: list[int]
    duplicated: list[int]
    reordered: list[int]
    wrong: list[int]
    told: int
    covered: int
    #: From the fault's end to the first canary message received after it.
    recover_s: float | None
    #: From the fault's end to the first message *published* after it: live again.
    live_s: float | None
    connects: int
    closes: list[int | None]


def _epoch_ranks(acks: Sequence[Ack]) -> dict[str, int]:
    """Each epoch's rank in the order the publisher first saw it (a later epoch replaced an
    earlier one: its history was lost)."""
    ranks: dict[str, int] = {}
    for ack in acks:
        ranks.setdefault(ack.epoch, len(ranks))
    return ranks


def covers(told: Told, ack: Ack, ranks: dict[str, int]) -> bool:
    """True when ``told`` explicitly gives up on ``ack``: same epoch at or below its offset, or
    an older epoch than the one it names. A told epoch the publisher never saw (nothing acked
    in it) gives up on what was acknowledged before the subscriber was told."""
    rank = ranks.get(told.epoch)
    if rank is None:
        return ack.at <= told.at
    if ack.epoch == told.epoch:
        return ack.offset <= told.offset
    return ranks[ack.epoch] < rank


def account(
    acks: Iterable[Ack], received: Sequence[Received], told: Sequence[Told], *,
    name: str = "", node: str = "", fault_end: float | None = None, connects: int = 0,
    closes: Sequence[int | None] = (),
) -> SubscriberResult:
    """Compare what one subscriber received and was told with what was acknowledged."""
    ordered = sorted(acks, key=lambda a: a.seq)
    by_seq = {a.seq: a for a in ordered}
    ranks = _epoch_ranks(ordered)
    seen: collections.Counter[int] = collections.Counter()
    duplicated: list[int] = []
    reordered: list[int] = []
    wrong: list[int] = []
    highest = 0
    for message in received:
        seen[message.seq] += 1
        if seen[message.seq] > 1:
            duplicated.append(message.seq)
            continue
        if message.seq < highest:
            reordered.append(message.seq)
        highest = max(highest, message.seq)
        ack = by_seq.get(message.seq)
        if ack is not None and (ack.offset, ack.epoch) != (message.offset, message.epoch):
            wrong.append(message.seq)
    lost: list[int] = []
    covered = 0
    for ack in ordered:
        if seen[ack.seq]:
            continue
        if any(covers(t, ack, ranks) for t in told):
            covered += 1
        else:
            lost.append(ack.seq)
    recover_s = live_s = None
    if fault_end is not None:
        after = [m.at for m in received if m.at >= fault_end]
        if after:
            recover_s = min(after) - fault_end
        live = [m.at for m in received
                if m.seq in by_seq and by_seq[m.seq].sent >= fault_end]
        if live:
            live_s = min(live) - fault_end
    return SubscriberResult(
        name=name, node=node, acked=len(ordered),
        received_once=sum(1 for a in ordered if seen[a.seq]),
        lost=lost, duplicated=duplicated, reordered=reordered, wrong=wrong, told=len(told),
        covered=covered, recover_s=recover_s, live_s=live_s, connects=connects,
        closes=[None if c is None else int(c) for c in closes],
    )


def ranges(seqs: Sequence[int], limit: int = 8) -> str:
    """``[3, 4, 5, 9]`` as ``3-5,9`` (the first ``limit`` runs), for reports."""
    runs: list[str] = []
    values = sorted(seqs)
    i = 0
    while i < len(values) and len(runs) < limit:
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        runs.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    more = "" if i >= len(values) else ",..."
    return ",".join(runs) + more


@dataclass(slots=True)
class Report:
    """The outcome of one chaos case: the publisher's side and every subscriber's accounting."""

    case: str
    acked: int
    refused: dict[str, int]
    unanswered: int
    subscribers: list[SubscriberResult]
    pub_recover_s: float | None = None
    caught_up: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return sum(len(s.lost) for s in self.subscribers)

    @property
    def dup(self) -> int:
        return sum(len(s.duplicated) for s in self.subscribers)

    @property
    def reordered(self) -> int:
        return sum(len(s.reordered) for s in self.subscribers)

    @property
    def wrong(self) -> int:
        return sum(len(s.wrong) for s in self.subscribers)

    @property
    def told(self) -> int:
        return sum(s.told for s in self.subscribers)

    @property
    def covered(self) -> int:
        return sum(s.covered for s in self.subscribers)

    @property
    def recover_s(self) -> float | None:
        """The slowest subscriber's (None: one never received anything after the fault)."""
        return _slowest([s.recover_s for s in self.subscribers])

    @property
    def live_s(self) -> float | None:
        return _slowest([s.live_s for s in self.subscribers])

    def line(self) -> str:
        """The one-line summary, e.g. ``chaos redis-kill: acked=412 lost=0 dup=0 ...``."""
        def seconds(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f}"

        refused = sum(self.refused.values())
        parts = [
            f"acked={self.acked}", f"refused={refused}", f"lost={self.lost}",
            f"dup={self.dup}", f"reordered={self.reordered}", f"wrong={self.wrong}",
            f"told={self.told}", f"covered={self.covered}",
            f"recover_s={seconds(self.recover_s)}", f"live_s={seconds(self.live_s)}",
            f"pub_recover_s={seconds(self.pub_recover_s)}",
            f"subs={len(self.subscribers)}",
            f"reconnects={sum(max(0, s.connects - 1) for s in self.subscribers)}",
        ]
        if not self.caught_up:
            parts.append("caught_up=no")
        parts += [f"{k}={v}" for k, v in self.extra.items()]
        return f"chaos {self.case}: " + " ".join(parts)

    def details(self) -> str:
        """Per subscriber: what went wrong, with seq ranges, for a failure message."""
        rows = [self.line(), f"  publisher: refused={dict(self.refused)} "
                             f"unanswered={self.unanswered}"]
        for s in self.subscribers:
            rec = "never" if s.recover_s is None else f"{s.recover_s:.2f}"
            live = "never" if s.live_s is None else f"{s.live_s:.2f}"
            rows.append(
                f"  {s.name}@{s.node}: received={s.received_once}/{s.acked} "
                f"lost={len(s.lost)}[{ranges(s.lost)}] dup={len(s.duplicated)}"
                f"[{ranges(s.duplicated)}] reordered={len(s.reordered)}[{ranges(s.reordered)}] "
                f"wrong={len(s.wrong)}[{ranges(s.wrong)}] told={s.told} covered={s.covered} "
                f"recover_s={rec} live_s={live} connects={s.connects} closes={s.closes}")
        return "\n".join(rows)


def _slowest(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


# --- network helpers -----------------------------------------------------------------------


def backoff(attempt: int, rng: random.Random) -> float:
    """Full-jitter backoff: uniform over [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(attempt, 16)))


async def open_ws(url: str) -> ClientConnection:
    """A native connection that has read its welcome; raises one of CONNECT_ERRORS."""
    async with asyncio.timeout(CONNECT_TIMEOUT):
        ws = await connect(url, compression=None, max_size=None, ping_interval=5,
                           ping_timeout=10, close_timeout=2, open_timeout=CONNECT_TIMEOUT)
        try:
            welcome = orjson.loads(await ws.recv())
        except BaseException:
            await ws.close()
            raise
    if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
        await ws.close()
        raise OSError(f"{url} did not start with welcome: {welcome!r}")
    return ws


CONNECT_ERRORS = (OSError, WebSocketException, TimeoutError)


async def _sleep_unless(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


# --- publisher -----------------------------------------------------------------------------


class Publisher:
    """Publishes canary messages at ``rate`` per second into ``room`` over ``urls[0]`` (the
    next URL after a failed connect), one request at a time, and records the outcome."""

    def __init__(self, urls: Sequence[str], room: str, rate: float, size: int = 0) -> None:
        self.urls = list(urls)
        self.room = room
        self.rate = rate
        self.pad = "x" * size
        self.acks: list[Ack] = []
        self.acked: set[int] = set()
        self.refused: collections.Counter[str] = collections.Counter()
        self.unanswered: set[int] = set()
        self.connects = 0
        self.seq = 0
        self._sent: dict[int, float] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None
        self._rng = random.Random(7)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="canary-publisher")

    async def stop(self, timeout: float = REPLY_TIMEOUT + 5) -> None:
        """Stop publishing (the request in flight gets its reply first), close the socket."""
        self._stop.set()
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=timeout)
            if not done:
                self._task.cancel()
                await asyncio.wait([self._task], timeout=5)
            if self._task.done() and not self._task.cancelled():
                self._task.result()  # a crash of the publisher is a harness bug: surface it
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 5)

    def acks_after(self, t: float) -> list[Ack]:
        return [a for a in self.acks if a.at >= t]

    async def _connection(self) -> ClientConnection | None:
        attempt = 0
        while self._ws is None and not self._stop.is_set():
            url = self.urls[attempt % len(self.urls)]
            try:
                self._ws = await open_ws(url)
                self.connects += 1
            except CONNECT_ERRORS:
                await _sleep_unless(self._stop, backoff(attempt, self._rng))
                attempt += 1
        return self._ws

    async def _run(self) -> None:
        next_at = now()
        while not self._stop.is_set():
            ws = await self._connection()
            if ws is None:
                return
            self.seq += 1
            seq = self.seq
            body = {"type": "publish", "room": self.room, "data": {"seq": seq, "pad": self.pad},
                    "id": seq}
            self._sent[seq] = now()
            try:
                await ws.send(orjson.dumps(body).decode())
                reply = await self._reply(ws, seq)
            except ConnectionClosed:
                self.unanswered.add(seq)
                self._ws = None
                continue
            except TimeoutError:
                self.unanswered.add(seq)
                reply = None
            if reply is not None:
                self._outcome(reply)
                if reply.get("code") == "rate_limited":
                    await _sleep_unless(self._stop, int(reply.get("retry_after_ms", 50)) / 1000)
            next_at = max(next_at + 1.0 / self.rate, now() - 1.0 / self.rate)
            await _sleep_unless(self._stop, max(0.0, next_at - now()))

    def _outcome(self, reply: dict[str, Any]) -> None:
        seq = reply.get("id")
        if not isinstance(seq, int):
            return
        self.unanswered.discard(seq)
        if reply.get("type") == "published":
            self.acks.append(Ack(seq, int(reply["offset"]), str(reply["epoch"]), now(),
                                 self._sent.get(seq, 0.0)))
            self.acked.add(seq)
        elif reply.get("type") == "error":
            self.refused[str(reply.get("code"))] += 1

    async def _reply(self, ws: ClientConnection, seq: int) -> dict[str, Any]:
        """The reply to ``seq``; late replies to earlier (unanswered) requests are recorded."""
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                reply = orjson.loads(await ws.recv())
                if not isinstance(reply, dict):
                    continue
                if reply.get("id") == seq:
                    return reply
                if reply.get("id") in self.unanswered:
                    self._outcome(reply)


# --- subscriber ----------------------------------------------------------------------------


class Subscriber:
    """A raw native client in ``room`` that reconnects over ``urls`` (its own node first) and
    rejoins with ``since``; it records every canary message, every explicit gap and its closes."""

    def __init__(self, name: str, urls: Sequence[str], room: str, node: str = "") -> None:
        self.name = name
        self.node = node
        self.urls = list(urls)
        self.room = room
        self.received: list[Received] = []
        self.seqs: set[int] = set()
        self.told: list[Told] = []
        self.closes: list[int | None] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.connects = 0
        self.joined = asyncio.Event()
        self.position: tuple[int, str] | None = None
        self._since_sent: tuple[int, str] | None = None
        self._stop = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random(name)
        self._joins = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"canary-{self.name}")

    async def stop(self) -> None:
        self._stop.set()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 3)
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=5)
            if not done:
                self._task.cancel()
                await asyncio.wait([self._task], timeout=5)

    def drop(self) -> None:
        """Abort the socket without a close frame (a network failure); it reconnects."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def _run(self) -> None:
        attempt = 0
        index = 0
        while not self._stop.is_set():
            url = self.urls[index % len(self.urls)]
            try:
                ws = await open_ws(url)
            except CONNECT_ERRORS:
                index += 1  # that node is gone: try the next one
                await _sleep_unless(self._stop, backoff(attempt, self._rng))
                attempt += 1
                continue
            self._ws = ws
            self.connects += 1
            opened = now()
            try:
                await self._session(ws)
            except ConnectionClosed:
                pass
            finally:
                self._ws = None
                self.closes.append(ws.close_code)
            if now() - opened > 5:
                attempt = 0
            await _sleep_unless(self._stop, backoff(attempt, self._rng))
            attempt += 1

    async def _send_join(self, ws: ClientConnection) -> None:
        self._joins += 1
        body: dict[str, Any] = {"type": "join", "room": self.room, "id": f"j{self._joins}"}
        self._since_sent = self.position
        if self.position is not None:
            body["since"] = {"offset": self.position[0], "epoch": self.position[1]}
        await ws.send(orjson.dumps(body).decode())

    async def _rejoin_later(self, ws: ClientConnection) -> None:
        await _sleep_unless(self._stop, REJOIN_DELAY)
        if not self._stop.is_set() and self._ws is ws:
            with contextlib.suppress(ConnectionClosed):
                await self._send_join(ws)

    async def _session(self, ws: ClientConnection) -> None:
        await self._send_join(ws)
        rejoin: asyncio.Task[None] | None = None
        try:
            async for raw in ws:
                envelope = orjson.loads(raw)
                kind = envelope.get("type")
                if kind == "message" and envelope.get("room") == self.room:
                    self._message(envelope)
                elif kind == "joined" and envelope.get("id") == f"j{self._joins}":
                    self._joined(envelope)
                elif kind == "gap" and envelope.get("room") == self.room:
                    self._told("gap", envelope)
                elif kind == "error":
                    self.errors[str(envelope.get("code"))] += 1
                    if envelope.get("id") == f"j{self._joins}" and (
                            rejoin is None or rejoin.done()):
                        rejoin = asyncio.create_task(self._rejoin_later(ws))
        finally:
            if rejoin is not None:
                rejoin.cancel()

    def _message(self, envelope: dict[str, Any]) -> None:
        data = envelope.get("data")
        offset, epoch = envelope.get("offset"), envelope.get("epoch")
        if not isinstance(data, dict) or not isinstance(offset, int) or not isinstance(epoch, str):
            return
        seq = data.get("seq")
        if not isinstance(seq, int):
            return
        self.received.append(Received(seq, offset, epoch, now()))
        self.seqs.add(seq)
        self._advance(offset, epoch)

    def _advance(self, offset: int, epoch: str) -> None:
        if self.position is None or self.position[1] != epoch or offset > self.position[0]:
            self.position = (offset, epoch)

    def _joined(self, envelope: dict[str, Any]) -> None:
        offset, epoch = envelope.get("offset"), envelope.get("epoch")
        self.joined.set()
        if not isinstance(offset, int) or not isinstance(epoch, str):
            return
        if self._since_sent is None:
            self.position = (offset, epoch)
        elif envelope.get("recovered") is False:
            self._told("recovered_false", envelope)
        # recovered: true: the replay that follows starts right after our position.

    def _told(self, kind: str, envelope: dict[str, Any]) -> None:
        offset, epoch = envelope.get("offset"), envelope.get("epoch")
        if not isinstance(offset, int) or not isinstance(epoch, str):
            return
        self.told.append(Told(kind, offset, epoch, now()))
        if kind == "recovered_false":
            self.position = (offset, epoch)  # live delivery continues from the joined position
        else:
            self._advance(offset, epoch)


# --- the canary ----------------------------------------------------------------------------


class Canary:
    """A publisher and subscribers in one room; see the module docstring.

    ``subscribers`` maps a node name to the URL list of that node's subscribers (their own node
    first, then where to go when it is gone); ``per_node`` subscribers are started for each.
    """

    def __init__(
        self, publish_urls: Sequence[str], subscribers: dict[str, Sequence[str]], *,
        room: str = "canary", rate: float = 20.0, size: int = 0, per_node: int = 2,
    ) -> None:
        self.room = room
        self.publisher = Publisher(publish_urls, room, rate, size)
        self.subscribers = [
            Subscriber(f"sub{node}{i}", urls, room, node)
            for node, urls in subscribers.items() for i in range(per_node)
        ]
        self.fault_end: float | None = None
        self._closed = False

    async def start(self, timeout: float = 15.0) -> None:
        """Every subscriber joined first (so each expects every ack), then the publisher."""
        for sub in self.subscribers:
            sub.start()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(sub.joined.wait() for sub in self.subscribers))
        self.publisher.start()

    def seen_by_all(self) -> int:
        """How many acknowledged messages every subscriber has received."""
        acked = self.publisher.acked
        return min((len(acked & sub.seqs) for sub in self.subscribers), default=0)

    async def wait_flowing(self, n: int = 20, timeout: float = 15.0) -> None:
        """Barrier: ``n`` acknowledged messages seen by every subscriber."""
        await _wait(lambda: self.seen_by_all() >= n, timeout,
                    f"{n} acked messages seen by every subscriber", self)

    def fault_ended(self) -> float:
        """Mark the end of the fault: recovery times are measured from here."""
        self.fault_end = now()
        return self.fault_end

    async def wait_acks_after_fault(self, n: int = 20, timeout: float = 30.0) -> None:
        """Barrier: the publisher got ``n`` acks after the fault ended."""
        assert self.fault_end is not None, "call fault_ended() first"
        end = self.fault_end
        await _wait(lambda: len(self.publisher.acks_after(end)) >= n, timeout,
                    f"{n} acks after the fault", self)

    def caught_up(self, sub: Subscriber) -> bool:
        """``sub`` received the last acknowledged message or was told past it."""
        acks = self.publisher.acks
        if not acks:
            return True
        last = max(acks, key=lambda a: a.seq)
        if last.seq in sub.seqs:
            return True
        ranks = _epoch_ranks(sorted(acks, key=lambda a: a.seq))
        return any(covers(t, last, ranks) for t in sub.told)

    async def finish(self, case: str, timeout: float = 20.0) -> Report:
        """Stop publishing, wait (bounded) until every subscriber caught up with the last ack,
        stop the subscribers and account for everything."""
        await self.publisher.stop()
        caught_up = True
        try:
            await _wait(lambda: all(self.caught_up(s) for s in self.subscribers), timeout,
                        "every subscriber caught up", None)
        except TimeoutError:
            caught_up = False
        await self.close()
        return self.report(case, caught_up)

    def report(self, case: str, caught_up: bool = True) -> Report:
        pub = self.publisher
        pub_recover = None
        if self.fault_end is not None:
            after = pub.acks_after(self.fault_end)
            pub_recover = after[0].at - self.fault_end if after else None
        results = [
            account(pub.acks, s.received, s.told, name=s.name, node=s.node,
                    fault_end=self.fault_end, connects=s.connects, closes=s.closes)
            for s in self.subscribers
        ]
        return Report(case, len(pub.acks), dict(pub.refused), len(pub.unanswered), results,
                      pub_recover, caught_up)

    async def close(self) -> None:
        """Stop everything (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self.publisher.stop()
        await asyncio.gather(*(s.stop() for s in self.subscribers))


async def _wait(predicate: Any, timeout: float, what: str, canary: Canary | None) -> None:
    deadline = now() + timeout
    while not predicate():
        if now() > deadline:
            state = ""
            if canary is not None:
                pub = canary.publisher
                state = (f" (acked={len(pub.acks)} refused={dict(pub.refused)} "
                         f"seen_by_all={canary.seen_by_all()})")
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{state}")
        await asyncio.sleep(0.05)
