"""Redis Cluster slots: every Lua script roomcast runs touches one slot, and only its KEYS.

The slot of a key is CRC16 (XMODEM) of the key, or of its ``{hash tag}``, mod 16384 (Redis
Cluster specification, "Keys distribution model"); it is computed here, independently of the
product. The real code paths of the Redis backends run against a real redis-server while every
script call is recorded (its ``keys=``) and every command Redis executes is read back with
MONITOR, so the checks see what Redis saw, including the commands a script ran itself.
tests/test_redis_cluster_slots.py runs the same scenario on a Redis Cluster node, where Redis
itself refuses a cross-slot script or command (CROSSSLOT).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from roomcast import clock
from roomcast.backends import presence_redis, redis_batch
from roomcast.backends.broker import Publication
from roomcast.backends.broker_redis import RedisBroker
from roomcast.backends.history_redis import RedisHistory
from roomcast.backends.keys import Keys
from roomcast.backends.presence import Member
from roomcast.backends.presence_redis import RedisPresence
from roomcast.backends.redis_common import as_str, load_script
from roomcast.config import Config
from roomcast.protocol import envelopes
from tests.harness import RedisServer, running_redis, wait_for

SLOTS = 16384

# --- the slot function, as Redis Cluster computes it -------------------------------------------


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, no reflection."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str | bytes) -> int:
    """The cluster slot of a key: only the part between the first ``{`` and the first ``}``
    after it is hashed, if that part is not empty; otherwise the whole key."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % SLOTS


def test_crc16_and_slot_of_the_specification_example() -> None:
    """The reference value of the spec: CRC16("123456789") is 0x31C3, slot 12739."""
    assert crc16(b"123456789") == 0x31C3
    assert key_slot("123456789") == 12739


def test_hash_tag_rules() -> None:
    """Keys with the same {tag} share a slot; an empty or unclosed tag hashes the whole key;
    only the first tag counts."""
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("{user1000}.following") == crc16(b"user1000") % SLOTS
    assert key_slot("foo{}{bar}") == crc16(b"foo{}{bar}") % SLOTS
    assert key_slot("foo{{bar}}zap") == crc16(b"{bar") % SLOTS
    assert key_slot("foo{bar}{zap}") == crc16(b"bar") % SLOTS
    assert key_slot("foo{bar") == crc16(b"foo{bar") % SLOTS
    keys = Keys("p")
    assert key_slot(keys.users("lobby")) == key_slot(keys.presence("lobby", "n9"))
    assert key_slot(keys.users("lobby")) != key_slot(keys.users("attic:2"))


# --- recording what the backends send ----------------------------------------------------------

LUA = resources.files("roomcast.backends").joinpath("lua")
SCRIPT_NAMES = sorted(
    entry.name.removesuffix(".lua") for entry in LUA.iterdir() if entry.name.endswith(".lua")
)


@dataclass
class ScriptCall:
    script: str
    keys: list[str]
    args: list[str]


class ScriptRecorder:
    """Wraps ``redis.asyncio.Redis.register_script`` so that every call of every script the
    backends register is recorded with its KEYS and ARGV."""

    def __init__(self) -> None:
        self.calls: list[ScriptCall] = []
        self.registered: set[str] = set()
        self._by_sha: dict[str, str] = {}
        self._names = {load_script(name): name for name in SCRIPT_NAMES}

    @contextlib.contextmanager
    def installed(self) -> Iterator[ScriptRecorder]:
        original = aioredis.Redis.register_script
        recorder = self

        class Recording:
            def __init__(self, inner: Any, name: str) -> None:
                self.inner, self.name = inner, name
                # What a caller that pipelines EVALSHA itself uses (RedisBroker's publishes).
                self.sha, self.script = inner.sha, inner.script
                recorder._by_sha[inner.sha] = name

            async def __call__(
                self, keys: Any = None, args: Any = None, client: Any = None
            ) -> Any:
                recorder.calls.append(ScriptCall(
                    self.name, [as_str(k) for k in keys or []], [as_str(a) for a in args or []]))
                return await self.inner(keys=keys, args=args, client=client)

        def register(client: aioredis.Redis, script: Any) -> Any:
            name = self._names[as_str(script)]  # A KeyError: a script not in lua/.
            self.registered.add(name)
            return Recording(original(client, script), name)

        original_command = Pipeline.execute_command
        original_run = redis_batch._Wire.run

        def record(args: tuple[Any, ...]) -> None:
            if args and args[0] == "EVALSHA" and args[1] in recorder._by_sha:
                numkeys = args[2]
                recorder.calls.append(ScriptCall(
                    recorder._by_sha[args[1]], [as_str(k) for k in args[3:3 + numkeys]],
                    [as_str(a) for a in args[3 + numkeys:]]))

        def execute_command(pipe: Any, *args: Any, **options: Any) -> Any:
            record(args)
            return original_command(pipe, *args, **options)

        async def run(wire: Any, batch: list[Any], transaction: bool) -> Any:
            for queued in batch:  # A batcher's batch, which bypasses Pipeline.
                record(queued.command)
            return await original_run(wire, batch, transaction)

        aioredis.Redis.register_script = register  # type: ignore[method-assign]
        Pipeline.execute_command = execute_command  # type: ignore[method-assign]
        redis_batch._Wire.run = run  # type: ignore[method-assign]
        try:
            yield self
        finally:
            aioredis.Redis.register_script = original  # type: ignore[method-assign]
            Pipeline.execute_command = original_command  # type: ignore[method-assign]
            redis_batch._Wire.run = original_run  # type: ignore[method-assign]


@dataclass
class Command:
    """One command as MONITOR reported it; ``source`` is 'lua' for a command a script ran."""

    source: str
    args: list[bytes]
    keys: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.args[0].decode().upper() if self.args else ""


_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", '"': b'"', "\\": b"\\"}
_LINE = re.compile(r"^\d+\.\d+ \[\d+ ([^\]]+)\] (.*)$")


def parse_monitor_args(text: str) -> list[bytes]:
    """The arguments of a MONITOR line: each double-quoted, escaped as sdscatrepr does."""
    out: list[bytes] = []
    i = 0
    while i < len(text):
        if text[i] == " ":
            i += 1
            continue
        assert text[i] == '"', text
        i += 1
        buf = bytearray()
        while text[i] != '"':
            if text[i] == "\\":
                if text[i + 1] == "x":
                    buf.append(int(text[i + 2 : i + 4], 16))
                    i += 4
                else:
                    buf += _ESCAPES[text[i + 1]]
                    i += 2
            else:
                buf += text[i].encode("latin-1")
                i += 1
        out.append(bytes(buf))
        i += 1
    return out


#: Commands the scenario sends that take no key (COMMAND GETKEYS refuses them).
KEYLESS_COMMANDS = {
    "CLIENT", "COMMAND", "DISCARD", "ECHO", "EXEC", "FLUSHDB", "HELLO", "MULTI", "PING",
    "PUBLISH", "SCRIPT", "SELECT", "SUBSCRIBE", "UNSUBSCRIBE",
}


class Monitor:
    """Every command the server runs, read from a MONITOR connection until stopped."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.commands: list[Command] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            # A script call with hundreds of arguments is one long line.
            asyncio.open_connection(self.host, self.port, limit=1 << 24), 5)
        self._writer.write(b"MONITOR\r\n")
        assert await asyncio.wait_for(self._reader.readline(), 5) == b"+OK\r\n"

    async def stop(self, client: aioredis.Redis, keys: bool = True) -> list[Command]:
        """Read up to a marker sent now (bounded), then close; resolve every command's keys
        (unless not ``keys``)."""
        assert self._reader is not None and self._writer is not None
        marker = f"end-of-monitor-{secrets.token_hex(4)}"
        await client.echo(marker)
        while True:
            line = (await asyncio.wait_for(self._reader.readline(), 10)).decode("latin-1")
            assert line.startswith("+"), line
            match = _LINE.match(line[1:].rstrip("\r\n"))
            assert match, line
            command = Command(match[1], parse_monitor_args(match[2]))
            if command.name == "ECHO" and command.args[1:] == [marker.encode()]:
                break
            self.commands.append(command)
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        if not keys:
            return self.commands
        # The keys of each command, as the server itself finds them (COMMAND GETKEYS).
        async with client.pipeline(transaction=False) as pipe:
            for command in self.commands:
                pipe.command_getkeys(*command.args)
            replies = await pipe.execute(raise_on_error=False)
        for command, reply in zip(self.commands, replies, strict=True):
            if isinstance(reply, ResponseError):
                # GETKEYS refuses commands without keys; only those may be refused.
                assert command.name in KEYLESS_COMMANDS, (command, reply)
            else:
                command.keys = [as_str(key) for key in reply]
        return self.commands


def every_name(keys: Keys, rooms: set[str], nodes: set[str],
               users: frozenset[str] | set[str] = frozenset(),
               idempotency_keys: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Every name that keys.py builds for these rooms, nodes, users and idempotency keys: any
    other name in Redis would have been formatted somewhere else."""
    names: set[str] = set()
    values = {"room": sorted(rooms), "node_id": sorted(nodes), "user_id": sorted(users),
              "key": sorted(idempotency_keys)}
    for attr, _ in inspect.getmembers(Keys, inspect.isfunction):
        method = getattr(keys, attr)
        params = list(inspect.signature(method).parameters)
        if attr.startswith("_") or not set(params) <= set(values):
            continue  # room_of_channel parses a name; it builds none.
        for combo in itertools.product(*(values[p] for p in params)):
            names.add(method(*combo))
    return names


# --- the scenario: every script of every backend, through the product's own code ---------------

GRACE = 0.3
LEASE = 2.0
WAIT = 10.0


class LeftLog:
    """on_user_left of every store: the calls in order, awaitable per user (bounded)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self._seen: dict[str, asyncio.Event] = {}

    async def __call__(self, room: str, user_id: str, username: str) -> None:
        self.calls.append((room, user_id, username))
        self._seen.setdefault(user_id, asyncio.Event()).set()

    async def wait(self, user_id: str) -> None:
        await asyncio.wait_for(self._seen.setdefault(user_id, asyncio.Event()).wait(), WAIT)

    def users(self) -> list[str]:
        return [user for _, user, _ in self.calls]


def member(user_id: str, node_id: str, conn_id: str, joined_at: int,
           nick: str | None = None) -> Member:
    return Member(user_id, user_id.title(), node_id, conn_id, joined_at, nick)


@dataclass
class Scenario:
    """What a run touched: the key prefix, rooms and nodes."""

    keys: Keys
    rooms: set[str] = field(default_factory=lambda: {"lobby", "attic:2"})
    nodes: set[str] = field(default_factory=lambda: {"n1", "n2", "n3"})
    users: set[str] = field(default_factory=lambda: {"ann", "cat"})
    #: Idempotency keys of publishes; braces in one, which must not move it out of the room.
    idempotency_keys: set[str] = field(default_factory=lambda: {"send-1 {attic:2}"})


async def run_scenario(url: str, flush: bool = True) -> Scenario:
    """Presence on three nodes (add, remove, claim_nick, members, stats, the reap of a dead
    node, user_left after the grace window, per-user connection counts, re-registration after
    Redis lost its data, clean shutdown) and a publish/history round trip, asserting the
    PresenceStore behaviour on the way. Needs presence_redis.TICK shortened by the caller."""
    scenario = Scenario(Keys(f"slots-{secrets.token_hex(4)}"))
    keys = scenario.keys
    clients: list[aioredis.Redis] = []

    def client() -> aioredis.Redis:
        clients.append(aioredis.Redis.from_url(url, socket_timeout=5))
        return clients[-1]

    admin = client()
    left = LeftLog()
    n1 = RedisPresence(client(), keys, "n1", GRACE, LEASE)
    n2 = RedisPresence(client(), keys, "n2", GRACE, LEASE)
    n3 = RedisPresence(client(), keys, "n3", GRACE, LEASE)  # Never started: it will "die".
    try:
        await n1.start(left)
        await n2.start(left)
        ann1, bob, ann3 = (member("ann", "n1", "c1", 1, "Ann"), member("bob", "n2", "c2", 2),
                           member("ann", "n2", "c3", 3, "ANN"))
        assert await n1.claim_nick("lobby", "Ann", ann1)
        assert await n1.add("lobby", ann1)
        assert not await n2.claim_nick("lobby", "ann", bob)  # A live other user holds it.
        assert await n2.claim_nick("lobby", "ANN", ann3)  # The same user takes it over.
        assert await n2.add("lobby", bob)
        assert not await n2.add("lobby", ann3)  # Ann's second connection: no user_joined.
        assert await n2.count("lobby") == 2
        # Ann's connections count cluster-wide: two of two, on two nodes.
        assert await n1.open_connection("ann", "c1", 2)
        assert await n2.open_connection("ann", "c3", 2)
        assert not await n1.open_connection("ann", "c9", 2)

        # n3 registers, holds entries and a nick in two rooms, and dies (its lease runs out).
        # Cat's member carries info, which lua/reap_node.lua decodes with the rest of the JSON.
        cat = dataclasses.replace(member("cat", "n3", "c4", 4, "Cat"),
                                  info={"roles": ["a", "b"], "n": 1.5, "x": None, "u": "é"})
        dan = member("dan", "n3", "c5", 5)
        assert await n3.claim_nick("lobby", "Cat", cat)
        assert await n3.open_connection("cat", "c4", 1)
        assert await n3.add("lobby", cat)
        assert await n3.add("attic:2", dan)
        eve = member("eve", "n1", "c6", 6, "cat")
        # A nick held by a node with no live lease can be taken.
        assert await n1.claim_nick("lobby", "cat", eve)
        await admin.zadd(keys.nodes(), {"n3": clock.now_ms() - 1})
        await left.wait("cat")
        await left.wait("dan")
        assert sorted(left.calls) == [("attic:2", "dan", "Dan"), ("lobby", "cat", "Cat")]
        assert await n2.members("lobby") == [ann1, bob, ann3]
        assert await n1.members("attic:2") == []
        assert not await n2.claim_nick("lobby", "CAT", bob)  # The reap left eve's nick alone.
        # The dead node's connection of cat no longer counts (and is dropped here).
        assert await n1.open_connection("cat", "c10", 1)
        await n1.close_connection("ann", "c1")

        n1.set_connection_count(1)
        n2.set_connection_count(2)
        expected = {"nodes": {"n1": {"connections": 1, "alive": True},
                              "n2": {"connections": 2, "alive": True}},
                    "rooms": {"lobby": 2}}

        async def stats_match() -> bool:
            return await n1.stats() == expected and await n2.stats() == expected

        await wait_for(stats_match, timeout=WAIT, what=f"stats {expected}")

        # Bob leaves for good; Ann drops one tab, then the other, and comes back in time.
        await n2.remove("lobby", bob)
        await n1.remove("lobby", ann1)
        await n2.remove("lobby", ann3)
        ann7 = member("ann", "n1", "c7", 7)
        assert not await n1.add("lobby", ann7)  # Back within the grace window.
        await left.wait("bob")
        # Barrier: zed leaves the same room after; leaves of one room go out in deadline
        # order, so a user_left for ann would have come before zed's.
        zed = member("zed", "n2", "c8", 8)
        assert await n2.add("lobby", zed)
        await n2.remove("lobby", zed)
        await left.wait("zed")
        assert left.users()[2:] == ["bob", "zed"]
        assert await n1.members("lobby") == [ann7]

        if flush:
            # Redis loses its data: each node writes its entries back on its next refresh.
            await admin.flushdb()

            async def back() -> bool:
                return await n2.members("lobby") == [ann7] and await admin.hgetall(
                    keys.user_connections("ann")) == {b"c3": b"n2"} and await admin.hgetall(
                    keys.user_connections("cat")) == {b"c10": b"n1"}

            await wait_for(back, timeout=WAIT, what="ann and cat re-registered")

        await n1.close()
        await n2.close()
        for user_id in scenario.users:  # One key per command, as everywhere here.
            assert not await admin.exists(keys.user_connections(user_id)), user_id
        assert await n3.members("lobby") == []
        assert await n3.stats() == {"nodes": {}, "rooms": {}}

        await publish_round_trip(url, keys, client, next(iter(scenario.idempotency_keys)))
    finally:
        for store in (n1, n2):
            await store.close()
        for redis in clients:
            with contextlib.suppress(Exception):
                await redis.aclose()
    return scenario


async def publish_round_trip(url: str, keys: Keys, client: Any, idempotency_key: str) -> None:
    """A message published by one broker reaches the room's subscriber and history; published
    again with an idempotency key and retried, it is stored once."""
    config = Config(redis_url=url, redis_prefix=keys.prefix, node_id="n1")
    broker = RedisBroker(client(), keys, config)
    history = RedisHistory(client(), keys)
    delivered: asyncio.Queue[Publication] = asyncio.Queue()
    await broker.start(delivered.put_nowait)
    try:
        assert await broker.wait_connected(WAIT)
        await broker.subscribe("lobby")
        prefix = envelopes.message_prefix("lobby", {"n": 1}, envelopes.sender("ann", "Ann"), 1)
        sent = await broker.publish("lobby", prefix, "c1")
        received = await asyncio.wait_for(delivered.get(), WAIT)
        assert (received.offset, received.payload) == (1, sent.payload)
        result = await history.read("lobby")
        assert (result.offset, result.epoch, result.messages) == (1, sent.epoch, [sent.payload])
        first = await broker.publish("lobby", prefix, "c1", idempotency_key, window=60.0)
        retry = await broker.publish("lobby", prefix, "c1", idempotency_key, window=60.0)
        assert (first.offset, first.duplicate, retry.offset, retry.duplicate) == (2, False, 2, True)
        assert (await history.read("lobby")).offset == 2
        # A history that went back below what a node delivered starts a new epoch.
        assert await history.restart_epoch("lobby", sent.epoch) != sent.epoch
    finally:
        await broker.close()


# --- against a real redis-server ---------------------------------------------------------------


@pytest.fixture
def fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Presence ticks every 50 ms instead of every second, so reaps and leaves come quickly."""
    monkeypatch.setattr(presence_redis, "TICK", 0.05)


@dataclass
class Observed:
    scenario: Scenario
    calls: list[ScriptCall]
    registered: set[str]
    commands: list[Command]


@pytest.fixture(scope="module")
def redis_plain() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture
async def observed(redis_plain: RedisServer, fast_ticks: None) -> AsyncIterator[Observed]:
    """The scenario run once on a plain redis-server, with script calls and MONITOR recorded."""
    monitor = Monitor("127.0.0.1", redis_plain.port)
    await monitor.start()
    admin = aioredis.Redis.from_url(redis_plain.url)
    try:
        with ScriptRecorder().installed() as recorder:
            scenario = await run_scenario(redis_plain.url)
        commands = await monitor.stop(admin)
        yield Observed(scenario, recorder.calls, recorder.registered, commands)
    finally:
        await admin.aclose()


def script_groups(commands: list[Command]) -> list[tuple[Command, list[Command]]]:
    """Each EVALSHA/EVAL with the commands its script ran (MONITOR lists them right after)."""
    groups: list[tuple[Command, list[Command]]] = []
    for command in commands:
        if command.source == "lua":
            assert groups, command
            groups[-1][1].append(command)
        elif command.name in ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO"):
            groups.append((command, []))
    return groups


async def test_every_script_call_stays_in_one_slot(observed: Observed) -> None:
    """Every script the backends register was called, and each call's KEYS share one slot."""
    assert observed.registered == set(SCRIPT_NAMES)
    assert {call.script for call in observed.calls} == set(SCRIPT_NAMES)
    for call in observed.calls:
        assert call.keys, call
        assert len({key_slot(key) for key in call.keys}) == 1, call
    # publish.lua's optional KEYS[3], an idempotency key, was among them.
    assert any(call.script == "publish" and len(call.keys) == 3 for call in observed.calls)


async def test_scripts_touch_only_the_keys_they_declare(observed: Observed) -> None:
    """Every command a script ran (as MONITOR saw it) touched only keys passed in its KEYS."""
    groups = script_groups(observed.commands)
    assert len(groups) >= len(observed.calls)  # NOSCRIPT retries add EVALSHAs, never remove.
    for script, ran in groups:
        declared = set(script.keys)
        for command in ran:
            assert set(command.keys) <= declared, (command, sorted(declared))


async def test_every_command_stays_in_one_slot(observed: Observed) -> None:
    """No plain command nor MULTI/EXEC transaction spans two slots (the scripts' own commands
    included): node-level and room keys always go in separate commands."""
    transaction: dict[str, set[int]] = {}
    for command in observed.commands:
        assert len({key_slot(key) for key in command.keys}) <= 1, command
    for command in observed.commands:
        # MONITOR shows a transaction as MULTI, its commands, then EXEC, from one client.
        if command.name == "MULTI":
            transaction[command.source] = set()
        elif command.name in ("EXEC", "DISCARD"):
            assert len(transaction.pop(command.source, set())) <= 1, command
        elif command.source in transaction:
            transaction[command.source] |= {key_slot(key) for key in command.keys}


async def test_keys_py_is_the_only_place_names_are_made(observed: Observed) -> None:
    """Every key Redis was asked about, by a script or a command, is a name keys.py builds
    for the scenario's rooms and nodes (so none was formatted elsewhere), and no script is
    handed the bare prefix to build names from."""
    keys = observed.scenario.keys
    known = every_name(keys, observed.scenario.rooms, observed.scenario.nodes,
                       observed.scenario.users, observed.scenario.idempotency_keys)
    touched = {key for command in observed.commands for key in command.keys}
    touched |= {key for call in observed.calls for key in call.keys}
    assert touched, "nothing recorded"
    for key in touched:
        assert key.startswith(keys.prefix + ":"), key
    assert touched <= known, sorted(touched - known)
    for call in observed.calls:
        assert keys.prefix not in call.args, call


# --- the Lua files themselves ------------------------------------------------------------------

_CALL = re.compile(r"redis\.p?call\(\s*'(\w+)'\s*(?:,\s*([^,)]+))?")
#: Commands whose first argument is not a key.
_KEYLESS = {"PUBLISH", "SPUBLISH"}
#: What building a Redis name inside Lua looks like: joining ':' or a {tag} onto a string.
_NAME_BUILDING = re.compile(r"\.\.\s*'[:{}]|'[{}]'\s*\.\.|\.\.\s*'}'")


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_lua_scripts_address_keys_only_through_keys(name: str) -> None:
    """Each script has a KEYS/ARGV header, names every key it touches as KEYS[n] and builds no
    Redis name by concatenation."""
    text = load_script(name)
    header = "".join(itertools.takewhile(lambda line: line.startswith("--"),
                                         text.splitlines(keepends=True)))
    assert "KEYS[1]" in header and "ARGV[1]" in header, name
    assert not _NAME_BUILDING.search(text), name
    calls = _CALL.findall(text)
    assert calls, name
    for command, first in calls:
        if command.upper() not in _KEYLESS:
            assert re.fullmatch(r"KEYS\[\d+\]", first.strip()), (name, command, first)
