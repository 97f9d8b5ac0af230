"""``python -m loadtest.bench`` (also ``roomcast bench``): fan-out throughput, latency and memory.

One run: start the servers (recording their PIDs), measure memory per idle connection, open S
subscribers across R rooms from the load-generator processes (timing how long until every one has
joined), let the join traffic settle, then publish M messages (at P per second, or as fast as
possible with --saturate) and wait, bounded, until every expected delivery arrived. The same
configuration then runs against the reference server (loadtest/reference_server.py; beside a
roomcast cluster, as many of its processes sharing a fresh redis-server, unless
--reference-alone) unless --no-reference, and against socket.io (loadtest/socketio/server.js)
with --socketio, and the summary table prints the ratios roomcast/reference and
roomcast/socket.io. Progress goes to stderr, the tables to stdout, everything to --out.

--acked measures something else: one publisher on node 0 sends M publishes, each asking for an
acknowledgement, with at most --window unanswered; acknowledged publishes per second, whether
the acks come in request order, and whether S members joined on another node receive every
acknowledged message exactly once and in order.

Every wait has a timeout and the whole run is bounded by --max-seconds; servers and load-generator
processes are stopped by PID on every exit path.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from loadtest import npmcache, procstat, report, servers, sio, wire
from loadtest.loadgen import (
    DIALECTS,
    AckedPublisher,
    Endpoint,
    Subscriber,
    Tally,
    WorkerHandle,
    open_client,
    room_name,
    subscriber_endpoint,
)

TARGETS = ("roomcast-embedded", "roomcast-cluster", "reference", "url")
MAX_DELIVERIES = 50_000_000  # Expected deliveries recorded per run (8 bytes of latency each).
POLL = 0.2  # Seconds between progress polls of the load generators.
OTHER_LOAD_LIMIT = 0.1  # Cores used by unrelated processes above which a run is flagged.
START_TIMEOUT = 20.0
DEFAULT_SUBSCRIBERS = 1000
DEFAULT_MEMBERS = 1  # -S with --acked.
DEFAULT_WINDOW = 256

DESCRIPTION = """\
Benchmark WebSocket fan-out: S subscribers across R rooms receive M messages from
one publisher. Reports connect + join time, deliveries/s, fan-out latency
percentiles, lost and duplicated messages, server CPU seconds and peak RSS,
deliveries per server CPU-second and memory per idle connection, beside the same
run against a bare python-websockets server (loadtest/reference_server.py; as
--nodes processes over Redis beside a roomcast cluster) and,
with --socketio, against socket.io 4 + @socket.io/redis-adapter under Node, for
ratios. --acked measures acknowledged publishes per second from one publisher
instead, and checks that a member on another node gets each one once, in order.
"""
EPILOG = (
    "examples:\n"
    "  python -m loadtest.bench                                  # quick run, ~30-60 s\n"
    "  python -m loadtest.bench --saturate -M 2000               # throughput per CPU-second\n"
    "  python -m loadtest.bench --target roomcast-cluster --sweep 250,500,1000\n"
    "  python -m loadtest.bench --target roomcast-cluster --saturate -S 1000 -M 2000 --socketio\n"
    "  python -m loadtest.bench --target roomcast-cluster --acked -M 20000\n"
    "  python -m loadtest.bench --target url --url ws://127.0.0.1:8000/ws --pid 1234\n"
)


class BenchError(Exception):
    """A run that cannot go on (a server did not start, nobody connected, out of time)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("give positive subscriber counts, e.g. 250,500,1000")
    return sizes


def default_client_procs() -> int:
    """One load-generator process per two cores, at least 1, at most 2 by default."""
    return max(1, min(2, len(os.sched_getaffinity(0)) // 2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's flags (shared by ``python -m loadtest.bench`` and ``roomcast bench``)."""
    what = parser.add_argument_group("what to measure")
    what.add_argument("--target", choices=TARGETS, default="roomcast-embedded",
                      help="servers to benchmark: one embedded node; a cluster of --nodes "
                      "nodes and a redis-server; the reference server alone; or --url "
                      "(default: roomcast-embedded)")
    what.add_argument("--nodes", type=_positive_int, default=2,
                      help="nodes of --target roomcast-cluster; subscribers spread over them "
                      "round-robin, the publisher uses node 0 (default: 2)")
    what.add_argument("--url", action="append", default=[], metavar="WS_URL",
                      help="with --target url: a ws:// URL to connect to (repeat for several "
                      "nodes); roomcast's is ws://HOST:PORT/ws")
    what.add_argument("--dialect", choices=DIALECTS, default="native",
                      help="with --target url: roomcast's protocol (join a room), the "
                      "reference's (just connect) or socket.io's (the URL ends in "
                      f"{sio.PATH}) (default: native)")
    what.add_argument("--pid", type=int, action="append", default=[],
                      help="with --target url: PID of a server process to measure CPU and RSS "
                      "of (repeat); the first one gets the idle connections")
    what.add_argument("--no-reference", action="store_true",
                      help="skip the run against the reference server (no ratios)")
    what.add_argument("--reference-alone", action="store_true",
                      help="with --target roomcast-cluster: run the reference as one process "
                      "without Redis; by default it runs as --nodes processes sharing a fresh "
                      "redis-server (loadtest/reference_server.py --redis-url), the bare "
                      "cluster beside the roomcast one")
    what.add_argument("--socketio", action="store_true",
                      help="also run socket.io 4 with @socket.io/redis-adapter under Node "
                      "(loadtest/socketio/server.js; as many processes as roomcast nodes, one "
                      "without Redis for roomcast-embedded) and print roomcast/socket.io "
                      "ratios; needs node and npm, and installs the pinned packages of "
                      "loadtest/socketio/package-lock.json with npm ci into "
                      "~/.cache/roomcast/ on first use (outside --max-seconds)")
    what.add_argument("--acked", action="store_true",
                      help="acknowledged-publish mode: one publisher on node 0 sends M "
                      "publishes, each asking for an ack, at most --window unanswered; reports "
                      "acked publishes/s, acks out of request order, and lost, duplicated and "
                      "out-of-order messages at S members (default 1) joined on node 1 (node 0 "
                      "with one node); no reference run (it has no acks) and no idle-memory "
                      "measurement, socket.io with --socketio (its ack callback)")
    what.add_argument("--node-arg", action="append", default=[], metavar="FLAG",
                      help="extra flag for every roomcast node, e.g. --node-arg=--history-size=0 "
                      "(repeat)")
    load = parser.add_argument_group("load")
    load.add_argument("-S", "--subscribers", type=_positive_int, default=None,
                      help=f"subscriber connections (default: {DEFAULT_SUBSCRIBERS}; "
                      f"{DEFAULT_MEMBERS} member with --acked)")
    load.add_argument("-R", "--rooms", type=_positive_int, default=1,
                      help="rooms the subscribers spread over; message i goes to room i %% R "
                      "(the reference has no rooms: every client gets every message) "
                      "(default: 1)")
    load.add_argument("-M", "--messages", type=_positive_int, default=500,
                      help="messages the publisher sends (default: 500)")
    load.add_argument("-P", "--rate", type=float, default=50.0,
                      help="messages per second in latency mode (default: 50)")
    load.add_argument("--saturate", action="store_true",
                      help="throughput mode: publish the M messages as fast as the connection "
                      "takes them; read deliveries per server CPU-second, not latency")
    load.add_argument("--window", type=_positive_int, default=DEFAULT_WINDOW,
                      help="with --acked: publishes sent and not yet acknowledged, at most "
                      f"(default: {DEFAULT_WINDOW})")
    load.add_argument("--message-size", type=_positive_int, default=100,
                      help="bytes of each publish request's JSON (default: 100)")
    load.add_argument("-K", "--idle-conns", type=int, default=500,
                      help="idle connections opened to measure memory per connection; 0 skips "
                      "it (default: 500)")
    load.add_argument("--sweep", type=_sizes, metavar="S1,S2,...",
                      help="run once per subscriber count (instead of -S) and draw a PNG of "
                      "latency and throughput against S")
    gen = parser.add_argument_group("load generator and limits")
    gen.add_argument("--client-procs", type=_positive_int, default=default_client_procs(),
                     help="load-generator processes holding the subscribers (default: "
                     f"{default_client_procs()} here: one per two cores, at most 2)")
    gen.add_argument("--concurrency", type=_positive_int, default=100,
                     help="connection handshakes in flight per load-generator process "
                     "(default: 100)")
    gen.add_argument("--backlog", type=_positive_int, default=servers.DEFAULT_BACKLOG,
                     help="listen backlog of every server started: the roomcast nodes "
                     "(--backlog), the reference and socket.io, so that a connect storm meets "
                     "the same kernel queue in each (default: "
                     f"{servers.DEFAULT_BACKLOG}, the node's own)")
    gen.add_argument("--connect-timeout", type=float, default=60.0,
                     help="seconds for all subscribers to connect and join (default: 60)")
    gen.add_argument("--drain-timeout", type=float, default=5.0,
                     help="seconds without a new delivery, after the last publish, before the "
                     "missing deliveries count as lost (default: 5)")
    gen.add_argument("--max-seconds", type=float, default=300.0,
                     help="hard limit on the whole bench; past it, it stops and exits 1 "
                     "(default: 300)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path,
                     help="JSON results file (default: results/bench-<timestamp>.json)")
    out.add_argument("--plot", type=Path,
                     help="PNG of the --sweep (default: the --out path with .png)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on the mode (-S: 1 member with --acked)."""
    if args.subscribers is None:
        args.subscribers = DEFAULT_MEMBERS if args.acked else DEFAULT_SUBSCRIBERS


def check(args: argparse.Namespace) -> str | None:
    """A one-line problem with the arguments, or None."""
    resolve_defaults(args)
    if args.socketio and args.target not in ("roomcast-embedded", "roomcast-cluster"):
        return "--socketio goes with --target roomcast-embedded or roomcast-cluster"
    if args.acked:
        if args.target == "reference" or (args.target == "url" and args.dialect == "reference"):
            return "--acked needs acknowledgements: the reference server sends none"
        if args.saturate or args.sweep:
            return "--acked is a mode of its own: drop --saturate and --sweep"
    if args.target == "url" and not args.url:
        return "--target url needs at least one --url ws://HOST:PORT/PATH"
    if args.target != "url" and (args.url or args.pid):
        return "--url and --pid go with --target url"
    for url in args.url:
        try:
            Endpoint.parse(url)
        except ValueError as exc:
            return str(exc)
    if not args.rate > 0:
        return "--rate must be above 0"
    if args.idle_conns < 0:
        return "--idle-conns must be 0 or more"
    sizes = args.sweep or [args.subscribers]
    if args.rooms > min(sizes):
        return f"--rooms ({args.rooms}) cannot exceed the subscribers ({min(sizes)})"
    if max(sizes) * args.messages > MAX_DELIVERIES:
        return f"S x M above {MAX_DELIVERIES:,} deliveries: lower --subscribers or --messages"
    if args.max_seconds <= 0 or args.connect_timeout <= 0 or args.drain_timeout <= 0:
        return "--max-seconds, --connect-timeout and --drain-timeout must be above 0"
    return None


def say(text: str) -> None:
    """A progress line on stderr."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


@dataclass
class Deadline:
    """The --max-seconds budget; every wait takes min(its own timeout, what is left)."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self, limit: float | None = None) -> float:
        remaining = self.seconds - (time.monotonic() - self.start)
        if remaining <= 0:
            raise BenchError(f"--max-seconds {self.seconds:g} reached; stopping")
        return remaining if limit is None else min(limit, remaining)


# --- one run -----------------------------------------------------------------------------------


@dataclass
class Bench:
    """What stays the same across the runs of one invocation."""

    args: argparse.Namespace
    workers: list[WorkerHandle]
    deadline: Deadline
    logdir: Path
    #: The socket.io packages (npmcache.ensure_installed), with --socketio.
    node_modules: Path | None = None

    async def all_workers(self, timeout: float, **command: Any) -> list[dict[str, Any]]:
        t = self.deadline.left(timeout)
        return list(await asyncio.gather(*(w.call(t, **command) for w in self.workers)))

    async def totals(self) -> dict[str, int]:
        replies = await self.all_workers(10, op="counts")
        return {key: sum(r[key] for r in replies) for key in ("messages", "other", "closed")}

    def split(self, count: int) -> list[tuple[int, int]]:
        """(first index, count) per worker: consecutive shares of ``count`` subscribers."""
        n = len(self.workers)
        shares = [count // n + (i < count % n) for i in range(n)]
        starts = [sum(shares[:i]) for i in range(n)]
        return list(zip(starts, shares, strict=True))

    async def connect(self, dep: servers.Deployment, urls: list[str], count: int, join: bool,
                      run_id: str) -> dict[str, Any]:
        """Open ``count`` clients over ``urls`` (joined to their rooms when ``join``).

        ``seconds``: from the first handshake sent until the last client was ready (joined),
        across all load generators.
        """
        a = self.args
        timeout = self.deadline.left(a.connect_timeout)
        start = time.monotonic()
        replies = await asyncio.gather(*(
            w.call(timeout + 5, op="connect", urls=urls, first=first, count=share,
                   rooms=a.rooms, messages=a.messages, dialect=dep.dialect, join=join,
                   run_id=run_id, concurrency=a.concurrency, timeout=timeout)
            for w, (first, share) in zip(self.workers, self.split(count), strict=True)
        ))
        seconds = time.monotonic() - start
        errors: dict[str, int] = {}
        for r in replies:
            for text, n in r["errors"].items():
                errors[text] = errors.get(text, 0) + n
        return {"ok": sum(r["ok"] for r in replies), "failed": sum(r["failed"] for r in replies),
                "expected": sum(r["expected"] for r in replies), "errors": errors,
                "seconds": seconds}

    async def measure_idle(self, dep: servers.Deployment, run_id: str) -> dict[str, Any]:
        """RSS of the idle connections' server before and after opening K of them, per K."""
        k = self.args.idle_conns
        idle: dict[str, Any] = {"connections": 0, "kib_per_conn": None}
        if k == 0 or dep.idle_pid is None:
            return idle
        before = procstat.rss_kib(dep.idle_pid)
        opened = await self.connect(dep, dep.subscriber_urls[:1], k, False, f"{run_id}i")
        await asyncio.sleep(0.3)  # The server finishes per-connection work after the handshake.
        after = procstat.rss_kib(dep.idle_pid)
        await self.all_workers(30, op="close")
        idle.update(connections=opened["ok"], rss_before_kib=before, rss_after_kib=after)
        if opened["ok"] and before is not None and after is not None:
            idle["kib_per_conn"] = (after - before) / opened["ok"]
        say(f"{dep.target}: {opened['ok']} idle connections: {num_kib(idle['kib_per_conn'])} "
            "KiB each")
        return idle

    async def settle(self, what: str) -> None:
        """Wait until the join traffic (welcome, joined, user_joined) stops arriving."""
        stable_since = time.monotonic()
        last = -1
        limit = time.monotonic() + self.deadline.left(60)
        while time.monotonic() < limit:
            other = (await self.totals())["other"]
            if other != last:
                last, stable_since = other, time.monotonic()
            elif time.monotonic() - stable_since >= 0.6:
                return
            await asyncio.sleep(POLL)
        say(f"{what}: join traffic still arriving after 60 s; measuring anyway")

    async def run_one(self, dep: servers.Deployment, subscribers: int) -> report.Run:
        a = self.args
        run_id = f"b{secrets.token_hex(3)}"
        warnings: list[str] = []
        idle = await self.measure_idle(dep, run_id)

        conn, setup_s = await self.join_subscribers(dep, dep.subscriber_urls, subscribers,
                                                    run_id, warnings)

        publisher = await self.open_publisher(dep, run_id)
        measured = [("coordinator", os.getpid())] + [
            (f"client-{w.index}", w.pid) for w in self.workers]
        before = cpu_sample(dep, measured)
        wall0 = time.monotonic()
        state = {"sent": 0}
        ticker = asyncio.ensure_future(self.progress(dep.target, state, conn["expected"]))
        try:
            first_send_ns = await self.publish(publisher, state)
            publish_s = time.monotonic() - wall0
            missing = await self.wait_delivered(conn["expected"])
            wall = time.monotonic() - wall0
            after = cpu_sample(dep, measured)
        finally:
            ticker.cancel()
            await publisher.close()
        if missing:
            warnings.append(f"gave up on {missing:,} deliveries after {a.drain_timeout:g} s "
                            "without progress")

        results = await self.all_workers(60, op="results")
        await self.all_workers(30, op="close")
        latencies, closes = merge_results(results)
        if closes:
            warnings.append(f"subscribers closed by the server during the run: {closes}")
        delivered = sum(r["delivered"] for r in results)
        last_ns = max(r["last_ns"] for r in results)
        span = (last_ns - first_send_ns) / 1e9 if last_ns > first_send_ns else 0.0

        server, generator, machine = self.figures(dep, measured, before, after, delivered,
                                                  wall)
        if machine["other_cores"] > OTHER_LOAD_LIMIT:
            warnings.append(
                f"processes outside the bench used {machine['other_cores']:.2f} of "
                f"{procstat.machine()['nproc']} cores meanwhile: latency figures are disturbed "
                "(CPU-second figures much less)")
        if generator["bottleneck"]:
            warnings.append(
                f"the load generator was the bottleneck: {generator['busiest']} used "
                f"{generator['max_core_pct']:.0f}% of a core (> {report.GENERATOR_LIMIT:.0f}%); "
                "latency and throughput figures are the generator's limit, not the server's")
        return {
            "target": dep.target,
            "config": {"subscribers": subscribers, "rooms": a.rooms, "messages": a.messages,
                       "rate": a.rate, "saturate": a.saturate, "message_size": a.message_size,
                       "client_procs": len(self.workers)},
            "connected": conn["ok"], "connect_failed": conn["failed"],
            "connect_s": round(conn["seconds"], 3), "connect_server_cpu_s": conn["server_cpu_s"],
            "connect_generator_max_core_pct": conn["generator_max_core_pct"],
            "connect_listen_overflows": conn["listen_overflows"],
            "join_messages": conn["join_messages"],
            "setup_s": round(setup_s, 2), "publish_s": round(publish_s, 3),
            "measured_s": round(wall, 3),
            "expected": sum(r["expected"] for r in results), "delivered": delivered,
            "lost": sum(r["lost"] for r in results),
            "duplicated": sum(r["duplicated"] for r in results),
            "misrouted": sum(r["misrouted"] for r in results),
            "out_of_order": sum(r["out_of_order"] for r in results),
            "lossy_subscribers": sum(r["lossy_subscribers"] for r in results),
            "closes": closes,
            "deliveries_per_s": delivered / span if span else None,
            "latency_ms": report.percentiles(latencies),
            "server": server, "generator": generator, "machine": machine, "idle": idle,
            "warnings": warnings,
        }

    async def join_subscribers(self, dep: servers.Deployment, urls: list[str], count: int,
                               run_id: str, warnings: list[str]) -> tuple[dict[str, Any], float]:
        """Connect and join ``count`` subscribers, then wait for the join traffic to settle.

        The connect reply (with ``seconds``: connect + join; ``server_cpu_s`` and
        ``generator_max_core_pct`` over those seconds; ``join_messages``: the envelopes other
        than bench messages the subscribers got until the traffic settled, such as roomcast's
        user_joined) and the whole setup's seconds.
        """
        a = self.args
        setup_start = time.monotonic()
        say(f"{dep.target}: connecting {count} subscribers across {a.rooms} room(s)")
        generators = [w.pid for w in self.workers]
        server0 = {pid: procstat.cpu_seconds(pid) for _, pid in dep.measured()}
        gen0 = {pid: procstat.cpu_seconds(pid) for pid in generators}
        overflows0 = procstat.listen_overflows()
        conn = await self.connect(dep, urls, count, True, run_id)
        overflows1 = procstat.listen_overflows()
        server1 = {pid: procstat.cpu_seconds(pid) for _, pid in dep.measured()}
        gen1 = {pid: procstat.cpu_seconds(pid) for pid in generators}
        if conn["ok"] == 0:
            raise BenchError(f"{dep.target}: no subscriber connected: {conn['errors']}")
        if conn["failed"]:
            warnings.append(f"{conn['failed']} subscribers failed to connect: {conn['errors']}")
        spent = [(server1[pid] or 0.0) - (server0[pid] or 0.0) for pid in server0]
        conn["server_cpu_s"] = round(sum(spent), 2)
        busiest = max(((gen1[pid] or 0.0) - (gen0[pid] or 0.0) for pid in generators),
                      default=0.0)
        conn["generator_max_core_pct"] = round(100 * busiest / conn["seconds"], 1)
        conn["listen_overflows"] = (None if overflows0 is None or overflows1 is None
                                    else overflows1 - overflows0)
        dropped = (f", {conn['listen_overflows']} SYNs dropped by a full listen backlog"
                   if conn["listen_overflows"] else "")
        say(f"{dep.target}: {conn['ok']} subscribers connected and joined in "
            f"{conn['seconds']:.2f} s (servers {conn['server_cpu_s']:.2f} CPU-s, busiest load "
            f"generator {conn['generator_max_core_pct']:.0f}% of a core{dropped})")
        if conn["generator_max_core_pct"] > report.GENERATOR_LIMIT:
            warnings.append("the load generator was the bottleneck while connecting: connect + "
                            "join time is the generator's limit, not the server's")
        await self.settle(dep.target)
        conn["join_messages"] = (await self.totals())["other"]
        await self.all_workers(10, op="reset")
        setup_s = time.monotonic() - setup_start
        say(f"{dep.target}: {conn['ok']} subscribers ready in {setup_s:.1f} s")
        return conn, setup_s

    def publisher_endpoint(self, dep: servers.Deployment, run_id: str) -> Endpoint:
        return subscriber_endpoint(Endpoint.parse(dep.publish_url), dep.dialect,
                                   f"{run_id}-publisher", None)

    async def open_publisher(self, dep: servers.Deployment, run_id: str) -> Subscriber:
        publisher = Subscriber(self.publisher_endpoint(dep, run_id), Tally(), 0, None,
                               dep.dialect)
        await open_client(publisher, self.deadline.left(10))
        return publisher

    async def publish(self, client: Subscriber, state: dict[str, int]) -> int:
        """Send M messages (paced at P/s, or back to back); the first one's send time (ns)."""
        a = self.args
        rooms = [room_name(i) for i in range(a.rooms)]
        socketio = client.dialect == "socketio"
        start = time.monotonic()
        first_ns = 0
        for seq in range(a.messages):
            if a.saturate:
                await client.drain()
                if seq % 64 == 0:
                    await asyncio.sleep(0)
            else:
                delay = start + seq / a.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if client.closed.done():
                raise BenchError(f"the publisher's connection closed ({client.close_code})")
            sent_ns = time.time_ns()
            first_ns = first_ns or sent_ns
            frame = wire.publish_frame(rooms[seq % a.rooms], seq, sent_ns, a.message_size)
            client.send_text(sio.event_frame("publish", frame) if socketio else frame)
            state["sent"] = seq + 1
            self.deadline.left()
        return first_ns

    async def wait_delivered(self, expected: int) -> int:
        """Poll until every expected delivery arrived; the number missing when progress stops."""
        progress_at = time.monotonic()
        last = -1
        while True:
            got = (await self.totals())["messages"]
            if got >= expected:
                return 0
            if got != last:
                last, progress_at = got, time.monotonic()
            elif time.monotonic() - progress_at > self.args.drain_timeout:
                return expected - got
            await asyncio.sleep(self.deadline.left(POLL))

    async def progress(self, target: str, state: dict[str, int], expected: int) -> None:
        start = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            got = (await self.totals())["messages"]
            elapsed = time.monotonic() - start
            say(f"{target}: {state['sent']}/{self.args.messages} sent, {got:,}/{expected:,} "
                f"delivered ({got / elapsed:,.0f}/s), {elapsed:.0f} s")

    def figures(self, dep: servers.Deployment, measured: list[tuple[str, int]],
                before: CpuSample, after: CpuSample, delivered: int, wall: float,
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
        """The servers', the load generators' and the machine's figures over a phase."""
        server = self.server_figures(dep, before.server, after.server, delivered)
        generator = self.generator_figures(measured, before.generator, after.generator, wall)
        machine = self.machine_figures(before.machine, after.machine, wall, server, generator)
        return server, generator, machine

    @staticmethod
    def server_figures(dep: servers.Deployment, cpu0: dict[int, tuple[float, float] | None],
                       cpu1: dict[int, tuple[float, float] | None],
                       delivered: int) -> dict[str, Any]:
        procs: list[dict[str, Any]] = []
        # Every server is started from an argv list (servers._start).
        argv = {p.pid: [str(arg) for arg in cast(list[Any], p.proc.args)]
                for p in dep.processes}
        for name, pid in dep.measured():
            before, after = cpu0.get(pid), cpu1.get(pid)
            user = sys_ = None
            if before is not None and after is not None:
                user, sys_ = after[0] - before[0], after[1] - before[1]
            procs.append({"name": name, "pid": pid,
                          "cpu_s": None if user is None or sys_ is None else user + sys_,
                          "user_s": user, "sys_s": sys_,
                          "peak_rss_kib": procstat.peak_rss_kib(pid), "argv": argv.get(pid)})

        def total(key: str) -> float | None:
            values = [p[key] for p in procs]
            return sum(values) if procs and None not in values else None

        cpu = total("cpu_s")
        return {
            "processes": procs,
            "cpu_s": cpu, "user_s": total("user_s"), "sys_s": total("sys_s"),
            "peak_rss_kib": total("peak_rss_kib"),
            # Below 0.05 CPU-s (5 clock ticks) the ratio is mostly tick rounding.
            "deliveries_per_cpu_s": delivered / cpu if cpu and cpu >= 0.05 else None,
        }

    @staticmethod
    def machine_figures(before: dict[str, float], after: dict[str, float], wall: float,
                        server: dict[str, Any], generator: dict[str, Any]) -> dict[str, float]:
        """Cores busy machine-wide during the phase that the bench's processes do not explain."""
        ours = (server["cpu_s"] or 0.0) + sum(p["cpu_s"] for p in generator["processes"])
        tasks = after["tasks"] - before["tasks"]
        return {
            "other_cores": max(0.0, tasks - ours) / wall if wall else 0.0,
            "irq_cores": (after["irq"] - before["irq"]) / wall if wall else 0.0,
            "steal_cores": (after["steal"] - before["steal"]) / wall if wall else 0.0,
        }

    @staticmethod
    def generator_figures(measured: list[tuple[str, int]], cpu0: dict[int, float | None],
                          cpu1: dict[int, float | None], wall: float) -> dict[str, Any]:
        procs: list[dict[str, Any]] = []
        for name, pid in measured:
            before, after = cpu0.get(pid), cpu1.get(pid)
            cpu = (after - before) if before is not None and after is not None else 0.0
            procs.append({"name": name, "pid": pid, "cpu_s": cpu,
                          "core_pct": 100 * cpu / wall if wall else 0.0})
        busiest = max(procs, key=lambda p: p["core_pct"])
        return {"processes": procs, "busiest": busiest["name"],
                "max_core_pct": busiest["core_pct"],
                "bottleneck": busiest["core_pct"] > report.GENERATOR_LIMIT}

    # --- deployments ---------------------------------------------------------------------------

    async def deploy(self, which: str) -> servers.Deployment:
        a = self.args
        timeout = self.deadline.left(START_TIMEOUT)
        if which == "reference":
            over_redis = a.target == "roomcast-cluster" and not a.reference_alone
            dep = await asyncio.to_thread(servers.start_reference, a.nodes if over_redis else 1,
                                          self.logdir, timeout, over_redis, a.backlog)
        elif which == "url":
            return servers.external(a.url, a.dialect, a.pid)
        elif which == "socketio":
            assert self.node_modules is not None
            dep = await asyncio.to_thread(
                servers.start_socketio, a.nodes, self.logdir, timeout,
                a.target == "roomcast-cluster", self.node_modules, a.backlog)
        else:
            dep = await asyncio.to_thread(
                servers.start_roomcast, a.nodes, self.logdir,
                ["--backlog", str(a.backlog), *a.node_arg], timeout,
                which == "roomcast-cluster")
        pids = ", ".join(f"{p.name} pid {p.pid} port {p.port}" for p in dep.processes)
        say(f"{dep.target}: started {pids}")
        return dep

    async def measure(self, which: str, subscribers: int) -> report.Run:
        dep = await self.deploy(which)
        try:
            if self.args.acked:
                return await self.run_acked(dep, subscribers)
            return await self.run_one(dep, subscribers)
        finally:
            await asyncio.to_thread(dep.stop)

    # --- acknowledged publishes ----------------------------------------------------------------

    async def run_acked(self, dep: servers.Deployment, members: int) -> report.Run:
        """One publisher on the first server, ``members`` joined on the others (or the first).

        The publisher keeps at most --window publishes unanswered; each acknowledgement frees a
        place. The members' figures count only acknowledged messages as expected.
        """
        a = self.args
        run_id = f"a{secrets.token_hex(3)}"
        warnings: list[str] = []
        member_urls = dep.subscriber_urls[1:] or dep.subscriber_urls[:1]
        conn, setup_s = await self.join_subscribers(dep, member_urls, members, run_id, warnings)

        publisher = AckedPublisher(self.publisher_endpoint(dep, run_id), dep.dialect,
                                   a.messages)
        await open_client(publisher, self.deadline.left(10))
        measured = [("coordinator", os.getpid())] + [
            (f"client-{w.index}", w.pid) for w in self.workers]
        before = cpu_sample(dep, measured)
        wall0 = time.monotonic()
        state = {"sent": 0}
        ticker = asyncio.ensure_future(self.acked_progress(dep.target, publisher, state))
        try:
            first_ns = time.time_ns()
            stalled = await self.publish_acked(publisher, state)
            publish_s = time.monotonic() - wall0
            unacked = publisher.unacked()
            expected = self.acked_expected(conn, members, set(unacked))
            missing = await self.wait_delivered(expected)
            wall = time.monotonic() - wall0
            after = cpu_sample(dep, measured)
        finally:
            ticker.cancel()
            await publisher.close()
        if stalled:
            warnings.append(f"no acknowledgement for {a.drain_timeout:g} s with "
                            f"{publisher.inflight} pending: stopped after {state['sent']:,} "
                            "publishes")
        if publisher.refused:
            warnings.append(f"{publisher.refused:,} publishes refused (error replies)")
        if missing:
            warnings.append(f"members: gave up on {missing:,} deliveries after "
                            f"{a.drain_timeout:g} s without progress")

        results = await self.all_workers(60, op="results", unacked=unacked)
        await self.all_workers(30, op="close")
        latencies, closes = merge_results(results)
        if closes:
            warnings.append(f"members closed by the server during the run: {closes}")
        if publisher.close_code not in (None, 1000):
            warnings.append(f"the publisher was closed with {publisher.close_code}")
        delivered = sum(r["delivered"] for r in results)
        ack_span = (publisher.last_ack_ns - first_ns) / 1e9 if publisher.acked else 0.0
        server, generator, machine = self.figures(dep, measured, before, after, delivered,
                                                  wall)
        cpu = server["cpu_s"]
        server["acked_per_cpu_s"] = publisher.acked / cpu if cpu and cpu >= 0.05 else None
        if machine["other_cores"] > OTHER_LOAD_LIMIT:
            warnings.append(
                f"processes outside the bench used {machine['other_cores']:.2f} of "
                f"{procstat.machine()['nproc']} cores meanwhile: the acked rate and latencies "
                "are disturbed (CPU-second figures much less)")
        if generator["bottleneck"]:
            warnings.append(
                f"the load generator was the bottleneck: {generator['busiest']} used "
                f"{generator['max_core_pct']:.0f}% of a core; the acked rate is the "
                "generator's limit, not the server's")
        say(f"{dep.target}: {publisher.acked:,} publishes acked: "
            f"{report.num(publisher.acked / ack_span if ack_span else None)} acked publishes/s")
        return {
            "target": dep.target, "mode": "acked",
            "config": {"subscribers": members, "rooms": a.rooms, "messages": a.messages,
                       "window": a.window, "message_size": a.message_size,
                       "client_procs": len(self.workers)},
            "publish_url": dep.publish_url, "member_urls": member_urls,
            "connected": conn["ok"], "connect_failed": conn["failed"],
            "connect_s": round(conn["seconds"], 3), "connect_server_cpu_s": conn["server_cpu_s"],
            "join_messages": conn["join_messages"], "setup_s": round(setup_s, 2),
            "publish_s": round(publish_s, 3), "measured_s": round(wall, 3),
            "sent": state["sent"], "acked": publisher.acked, "refused": publisher.refused,
            "unanswered": state["sent"] - publisher.acked - publisher.refused,
            "acks_out_of_order": publisher.out_of_order,
            "duplicate_acks": publisher.duplicate_acks, "stray_acks": publisher.stray,
            "acked_per_s": publisher.acked / ack_span if ack_span else None,
            "ack_latency_ms": report.percentiles(publisher.ack_latencies_us),
            "expected": sum(r["expected"] for r in results), "delivered": delivered,
            "lost": sum(r["lost"] for r in results),
            "duplicated": sum(r["duplicated"] for r in results),
            "out_of_order": sum(r["out_of_order"] for r in results),
            "misrouted": sum(r["misrouted"] for r in results),
            "closes": closes,
            "latency_ms": report.percentiles(latencies),
            "server": server, "generator": generator, "machine": machine,
            "warnings": warnings,
        }

    async def publish_acked(self, pub: AckedPublisher, state: dict[str, int]) -> bool:
        """Send M publishes, at most --window unanswered, and wait for the last answers.

        True when it stopped early: no answer came for --drain-timeout seconds.
        """
        a = self.args
        rooms = [room_name(i) for i in range(a.rooms)]
        for seq in range(a.messages):
            while pub.inflight >= a.window:
                if not await self.answer(pub):
                    return True
            await pub.drain()
            if pub.closed.done():
                raise BenchError(f"the publisher's connection closed ({pub.close_code})")
            pub.send_publish(rooms[seq % a.rooms], seq, a.message_size)
            state["sent"] = seq + 1
        while pub.inflight > 0:
            if not await self.answer(pub):
                return True
        return False

    async def answer(self, pub: AckedPublisher) -> bool:
        """Wait for the next acknowledgement; False after --drain-timeout without one."""
        pub.answered.clear()
        try:
            await asyncio.wait_for(pub.answered.wait(),
                                   self.deadline.left(self.args.drain_timeout))
        except TimeoutError:
            self.deadline.left()  # Out of --max-seconds: BenchError rather than a stall.
            return False
        return True

    def acked_expected(self, conn: dict[str, Any], members: int, unacked: set[int]) -> int:
        """Deliveries the members owe: each acknowledged message, once per member of its room.

        Exact when every member connected; otherwise the connect count stands (the wait then
        ends on --drain-timeout and the per-member figures are still exact).
        """
        if not unacked:
            return int(conn["expected"])
        if conn["failed"]:
            return int(conn["expected"])
        rooms: int = self.args.rooms
        missing_per_room = [0] * rooms
        for seq in unacked:
            missing_per_room[seq % rooms] += 1
        return int(conn["expected"]) - sum(missing_per_room[i % rooms] for i in range(members))

    async def acked_progress(self, target: str, pub: AckedPublisher,
                             state: dict[str, int]) -> None:
        start = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            got = (await self.totals())["messages"]
            elapsed = time.monotonic() - start
            say(f"{target}: {state['sent']:,}/{self.args.messages:,} sent, {pub.acked:,} "
                f"acked ({pub.acked / elapsed:,.0f}/s), {got:,} received by the members, "
                f"{elapsed:.0f} s")


@dataclass(frozen=True)
class CpuSample:
    """CPU used so far by the servers (user, system) and the load generators, and the machine's."""

    server: dict[int, tuple[float, float] | None]
    generator: dict[int, float | None]
    machine: dict[str, float]


def cpu_sample(dep: servers.Deployment, measured: list[tuple[str, int]]) -> CpuSample:
    return CpuSample({pid: procstat.cpu_times(pid) for _, pid in dep.measured()},
                     {pid: procstat.cpu_seconds(pid) for _, pid in measured},
                     procstat.machine_cpu())


def merge_results(results: list[dict[str, Any]]) -> tuple[array.array[int], dict[str, int]]:
    """The load generators' latency samples (microseconds) and close codes, merged."""
    latencies: array.array[int] = array.array("q")
    closes: dict[str, int] = {}
    for r in results:
        latencies.frombytes(r["latencies_us"])
        for code, n in r["closes"].items():
            closes[code] = closes.get(code, 0) + n
    return latencies, closes


def num_kib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


# --- the whole invocation ----------------------------------------------------------------------


def stop_workers(workers: list[WorkerHandle]) -> None:
    for worker in workers:
        worker.stop()


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


async def bench(args: argparse.Namespace, out: Path) -> int:
    from loadtest.loadgen import start_workers

    node_modules = None
    if args.socketio:  # Before the --max-seconds clock: a first install may take a while.
        try:
            node_modules = await asyncio.to_thread(npmcache.ensure_installed, say=say)
        except npmcache.NpmError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        say(f"socket.io packages in {node_modules}")
    deadline = Deadline(args.max_seconds)
    logdir = Path(tempfile.mkdtemp(prefix="roomcast-bench-"))
    doc: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": sys.argv, "machine": procstat.machine(), "code": procstat.code_version(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k != "func"},
        "points": [], "plot": None, "error": None,
    }
    sizes = args.sweep or [args.subscribers]
    # No reference in --acked mode: the bare server acknowledges nothing.
    with_reference = not args.no_reference and args.target != "reference" and not args.acked
    say(f"{len(args.sweep or [1])} point(s), {args.client_procs} load-generator process(es), "
        f"servers' logs in {logdir}")
    workers = await asyncio.to_thread(start_workers, args.client_procs)
    points: list[report.Point] = []
    ok = False
    try:
        run = Bench(args, workers, deadline, logdir, node_modules)
        await run.all_workers(30, op="counts")  # Spawned and serving.
        for size in sizes:
            target = await run.measure(args.target, size)
            ref = await run.measure("reference", size) if with_reference else None
            sio_run = await run.measure("socketio", size) if args.socketio else None
            points.append((target, ref, sio_run))
            doc["points"].append({
                "target": target, "reference": ref, "socketio": sio_run,
                "ratios": report.ratios(target, ref) if ref else None,
                "ratios_socketio": report.ratios(target, sio_run) if sio_run else None,
            })
            write_json(out, doc)
            text = (report.acked_summary(target, sio_run) if args.acked
                    else report.summary(target, ref, sio_run))
            print(text + "\n", flush=True)
        if args.sweep:
            print("== sweep: " + ", ".join(str(s) for s in sizes) + " subscribers", flush=True)
            print(report.sweep_table(points) + "\n", flush=True)
            plot = args.plot or out.with_suffix(".png")
            report.plot_sweep(points, plot)
            doc["plot"] = str(plot)
            say(f"plot written to {plot}")
        ok = True
    except (BenchError, servers.StartError, TimeoutError, RuntimeError, OSError) as exc:
        doc["error"] = str(exc)
        print(f"bench: {exc}", file=sys.stderr)
    finally:
        await asyncio.to_thread(stop_workers, workers)
        write_json(out, doc)
        say(f"results written to {out}")
    keep_logs_on_failure(logdir, ok)
    return 0 if ok else 1


def keep_logs_on_failure(logdir: Path, ok: bool) -> None:
    """The servers' logs are kept (and their place said) only when a run failed."""
    if not ok and any(logdir.iterdir()):
        print(f"bench: servers' logs kept in {logdir}", file=sys.stderr)
    else:
        shutil.rmtree(logdir, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """Run the bench for parsed ``args``; the process exit code (2 for a bad argument)."""
    problem = check(args)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or Path("results") / f"bench-{stamp}.json"
    import uvloop

    return int(uvloop.run(bench(args, out)))


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
