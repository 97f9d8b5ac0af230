"""``python -m loadtest.bench`` (also ``roomcast bench``): fan-out throughput, latency and memory.

One run: start the servers (recording their PIDs), measure memory per idle connection, open S
subscribers across R rooms from the load-generator processes, let the join traffic settle, then
publish M messages (at P per second, or as fast as possible with --saturate) and wait, bounded,
until every expected delivery arrived. The same configuration then runs against the reference
server (loadtest/reference_server.py) unless --no-reference, and the summary table prints the
ratios roomcast/reference. Progress goes to stderr, the tables to stdout, everything to --out.

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
from typing import Any

from loadtest import procstat, report, servers, wire
from loadtest.loadgen import Endpoint, Subscriber, Tally, WorkerHandle, open_client, room_name

TARGETS = ("roomcast-embedded", "roomcast-cluster", "reference", "url")
MAX_DELIVERIES = 50_000_000  # Expected deliveries recorded per run (8 bytes of latency each).
POLL = 0.2  # Seconds between progress polls of the load generators.
OTHER_LOAD_LIMIT = 0.1  # Cores used by unrelated processes above which a run is flagged.
START_TIMEOUT = 20.0

DESCRIPTION = """\
Benchmark WebSocket fan-out: S subscribers across R rooms receive M messages from
one publisher. Reports deliveries/s, fan-out latency percentiles, lost and
duplicated messages, server CPU seconds and peak RSS, deliveries per server
CPU-second and memory per idle connection, beside the same run against a bare
python-websockets server (loadtest/reference_server.py) for ratios.
"""
EPILOG = (
    "examples:\n"
    "  python -m loadtest.bench                                  # quick run, ~30-60 s\n"
    "  python -m loadtest.bench --saturate -M 2000               # throughput per CPU-second\n"
    "  python -m loadtest.bench --target roomcast-cluster --sweep 250,500,1000\n"
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
    what.add_argument("--dialect", choices=("native", "reference"), default="native",
                      help="with --target url: roomcast's protocol (join a room) or the "
                      "reference's (just connect) (default: native)")
    what.add_argument("--pid", type=int, action="append", default=[],
                      help="with --target url: PID of a server process to measure CPU and RSS "
                      "of (repeat); the first one gets the idle connections")
    what.add_argument("--no-reference", action="store_true",
                      help="skip the run against the reference server (no ratios)")
    what.add_argument("--node-arg", action="append", default=[], metavar="FLAG",
                      help="extra flag for every roomcast node, e.g. --node-arg=--history-size=0 "
                      "(repeat)")
    load = parser.add_argument_group("load")
    load.add_argument("-S", "--subscribers", type=_positive_int, default=1000,
                      help="subscriber connections (default: 1000)")
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


def check(args: argparse.Namespace) -> str | None:
    """A one-line problem with the arguments, or None."""
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
        a = self.args
        timeout = self.deadline.left(a.connect_timeout)
        replies = await asyncio.gather(*(
            w.call(timeout + 5, op="connect", urls=urls, first=first, count=share,
                   rooms=a.rooms, messages=a.messages, native=dep.native, join=join,
                   run_id=run_id, concurrency=a.concurrency, timeout=timeout)
            for w, (first, share) in zip(self.workers, self.split(count), strict=True)
        ))
        errors: dict[str, int] = {}
        for r in replies:
            for text, n in r["errors"].items():
                errors[text] = errors.get(text, 0) + n
        return {"ok": sum(r["ok"] for r in replies), "failed": sum(r["failed"] for r in replies),
                "expected": sum(r["expected"] for r in replies), "errors": errors}

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

        setup_start = time.monotonic()
        say(f"{dep.target}: connecting {subscribers} subscribers across {a.rooms} room(s)")
        conn = await self.connect(dep, dep.subscriber_urls, subscribers, True, run_id)
        if conn["ok"] == 0:
            raise BenchError(f"{dep.target}: no subscriber connected: {conn['errors']}")
        if conn["failed"]:
            warnings.append(f"{conn['failed']} subscribers failed to connect: {conn['errors']}")
        await self.settle(dep.target)
        await self.all_workers(10, op="reset")
        setup_s = time.monotonic() - setup_start
        say(f"{dep.target}: {conn['ok']} subscribers ready in {setup_s:.1f} s")

        publisher = await self.open_publisher(dep, run_id)
        measured = [("coordinator", os.getpid())] + [
            (f"client-{w.index}", w.pid) for w in self.workers]
        server_cpu0 = {pid: procstat.cpu_times(pid) for _, pid in dep.measured()}
        gen_cpu0 = {pid: procstat.cpu_seconds(pid) for _, pid in measured}
        machine0 = procstat.machine_cpu()
        wall0 = time.monotonic()
        state = {"sent": 0}
        ticker = asyncio.ensure_future(self.progress(dep.target, state, conn["expected"]))
        try:
            first_send_ns = await self.publish(publisher, state)
            publish_s = time.monotonic() - wall0
            missing = await self.wait_delivered(conn["expected"])
            wall = time.monotonic() - wall0
            server_cpu1 = {pid: procstat.cpu_times(pid) for _, pid in dep.measured()}
            gen_cpu1 = {pid: procstat.cpu_seconds(pid) for _, pid in measured}
            machine1 = procstat.machine_cpu()
        finally:
            ticker.cancel()
            await publisher.close()
        if missing:
            warnings.append(f"gave up on {missing:,} deliveries after {a.drain_timeout:g} s "
                            "without progress")

        results = await self.all_workers(60, op="results")
        await self.all_workers(30, op="close")
        latencies: array.array[int] = array.array("q")
        for r in results:
            latencies.frombytes(r["latencies_us"])
        closes: dict[str, int] = {}
        for r in results:
            for code, n in r["closes"].items():
                closes[code] = closes.get(code, 0) + n
        if closes:
            warnings.append(f"subscribers closed by the server during the run: {closes}")
        delivered = sum(r["delivered"] for r in results)
        last_ns = max(r["last_ns"] for r in results)
        span = (last_ns - first_send_ns) / 1e9 if last_ns > first_send_ns else 0.0

        server = self.server_figures(dep, server_cpu0, server_cpu1, delivered)
        generator = self.generator_figures(measured, gen_cpu0, gen_cpu1, wall)
        machine = self.machine_figures(machine0, machine1, wall, server, generator)
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
            "setup_s": round(setup_s, 2), "publish_s": round(publish_s, 3),
            "measured_s": round(wall, 3),
            "expected": sum(r["expected"] for r in results), "delivered": delivered,
            "lost": sum(r["lost"] for r in results),
            "duplicated": sum(r["duplicated"] for r in results),
            "misrouted": sum(r["misrouted"] for r in results),
            "lossy_subscribers": sum(r["lossy_subscribers"] for r in results),
            "closes": closes,
            "deliveries_per_s": delivered / span if span else None,
            "latency_ms": report.percentiles(latencies),
            "server": server, "generator": generator, "machine": machine, "idle": idle,
            "warnings": warnings,
        }

    async def open_publisher(self, dep: servers.Deployment, run_id: str) -> Subscriber:
        endpoint = Endpoint.parse(dep.publish_url)
        if dep.native:
            endpoint = endpoint.with_query(user_id=f"{run_id}-publisher")
        publisher = Subscriber(endpoint, Tally(), 0, None, dep.native)
        await open_client(publisher, self.deadline.left(10))
        return publisher

    async def publish(self, client: Subscriber, state: dict[str, int]) -> int:
        """Send M messages (paced at P/s, or back to back); the first one's send time (ns)."""
        a = self.args
        rooms = [room_name(i) for i in range(a.rooms)]
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
            client.send_text(wire.publish_frame(rooms[seq % a.rooms], seq, sent_ns,
                                                a.message_size))
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

    @staticmethod
    def server_figures(dep: servers.Deployment, cpu0: dict[int, tuple[float, float] | None],
                       cpu1: dict[int, tuple[float, float] | None],
                       delivered: int) -> dict[str, Any]:
        procs: list[dict[str, Any]] = []
        for name, pid in dep.measured():
            before, after = cpu0.get(pid), cpu1.get(pid)
            user = sys_ = None
            if before is not None and after is not None:
                user, sys_ = after[0] - before[0], after[1] - before[1]
            procs.append({"name": name, "pid": pid,
                          "cpu_s": None if user is None or sys_ is None else user + sys_,
                          "user_s": user, "sys_s": sys_,
                          "peak_rss_kib": procstat.peak_rss_kib(pid)})

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
            dep = await asyncio.to_thread(servers.start_reference, self.logdir, timeout)
        elif which == "url":
            return servers.external(a.url, a.dialect == "native", a.pid)
        else:
            dep = await asyncio.to_thread(
                servers.start_roomcast, a.nodes, self.logdir, a.node_arg, timeout,
                which == "roomcast-cluster")
        pids = ", ".join(f"{p.name} pid {p.pid} port {p.port}" for p in dep.processes)
        say(f"{dep.target}: started {pids}")
        return dep

    async def measure(self, which: str, subscribers: int) -> report.Run:
        dep = await self.deploy(which)
        try:
            return await self.run_one(dep, subscribers)
        finally:
            await asyncio.to_thread(dep.stop)


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
    with_reference = not args.no_reference and args.target != "reference"
    say(f"{len(args.sweep or [1])} point(s), {args.client_procs} load-generator process(es), "
        f"servers' logs in {logdir}")
    workers = await asyncio.to_thread(start_workers, args.client_procs)
    points: list[tuple[report.Run, report.Run | None]] = []
    ok = False
    try:
        run = Bench(args, workers, deadline, logdir)
        await run.all_workers(30, op="counts")  # Spawned and serving.
        for size in sizes:
            target = await run.measure(args.target, size)
            ref = await run.measure("reference", size) if with_reference else None
            points.append((target, ref))
            doc["points"].append({"target": target, "reference": ref,
                                  "ratios": report.ratios(target, ref) if ref else None})
            write_json(out, doc)
            print(report.summary(target, ref) + "\n", flush=True)
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
