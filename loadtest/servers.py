"""The servers under test, started as real processes on 127.0.0.1 and stopped by PID.

A ``Deployment`` is what one bench run talks to: the URLs subscribers spread over, the URL the
publisher uses, the dialect spoken there, the PIDs whose CPU and memory are measured, and the PID
that receives the idle connections of the memory measurement. Every start waits, bounded, for the
port to answer. Three kinds: roomcast nodes (alone or sharing a redis-server), the bare
python-websockets reference, and the socket.io reference (loadtest/socketio/server.js under
Node, alone or sharing a redis-server through @socket.io/redis-adapter).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import sio
from roomcast.config import Config
from roomcast.tools.procs import find_binary, free_port

#: The listen backlog of every server the bench starts (its --backlog): the node's own default.
DEFAULT_BACKLOG = Config().backlog
#: Flags every bench node gets: the publisher is not rate limited, nodes exit at once when
#: stopped (no drain delay), and logs stay at warning (nothing per connection).
NODE_FLAGS = (
    "--rate-limit", "1000000", "--rate-burst", "1000000",
    "--drain-delay", "0", "--drain-window", "0",
    "--log-format", "json", "--log-level", "warning",
)
START_ATTEMPTS = 3
SOCKETIO_SERVER = Path(__file__).resolve().parent / "socketio" / "server.js"


class StartError(RuntimeError):
    """A server did not come up; the message ends with the tail of its log."""


@dataclass
class ServerProcess:
    name: str
    role: str  # node, redis, reference or socketio
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Deployment:
    """The servers of one run and how clients reach them."""

    target: str
    dialect: str  # loadgen.NATIVE (rooms, join), REFERENCE (just connect) or SOCKETIO
    subscriber_urls: list[str]
    publish_url: str
    processes: list[ServerProcess] = field(default_factory=list)
    #: PIDs measured when the bench did not start the servers (--target url --pid ...).
    external_pids: list[int] = field(default_factory=list)
    #: The process that receives the idle connections of the memory measurement.
    idle_pid: int | None = None

    def measured(self) -> list[tuple[str, int]]:
        """(name, pid) of every server process whose CPU and memory count."""
        named = [(p.name, p.pid) for p in self.processes]
        return named + [(f"pid-{pid}", pid) for pid in self.external_pids]

    def stop(self) -> None:
        """SIGTERM every process we started (nodes first, Redis last), SIGKILL after 10 s."""
        for server in sorted(self.processes, key=lambda p: p.role == "redis"):
            stop_process(server.proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _answers(port: int, probe: bytes, expect: bytes) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(
        ("127.0.0.1", port), timeout=0.5
    ) as sock:
        if not probe:
            return True
        sock.sendall(probe)
        return sock.recv(64).startswith(expect)
    return False


def _spawn(
    name: str, role: str, argv: list[str], port: int, logdir: Path,
    probe: bytes, expect: bytes, timeout: float, env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``argv`` with its output in ``logdir/name.log``; wait until ``probe`` is answered."""
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"{name} exited with {proc.returncode}: {_tail(log)}")
        if _answers(port, probe, expect):
            return ServerProcess(name, role, proc, port, log)
        time.sleep(0.05)
    stop_process(proc)
    raise StartError(f"{name} did not answer on port {port} within {timeout:.0f}s: {_tail(log)}")


def _start(
    name: str, role: str, argv_for: Callable[[int], list[str]], logdir: Path, probe: bytes,
    expect: bytes, timeout: float, env: dict[str, str] | None = None,
) -> ServerProcess:
    """_spawn on a fresh free port, again on another one if the first was taken meanwhile."""
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        try:
            return _spawn(name, role, argv_for(port), port, logdir, probe, expect, timeout, env)
        except StartError:
            if attempt == START_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-600:].strip() or "(no output)"
    except OSError:
        return "(no log)"


READY_PROBE = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def start_node(
    index: int, logdir: Path, redis_url: str | None, extra: list[str], timeout: float,
    prefix: str = "roomcast",
) -> ServerProcess:
    def argv(port: int) -> list[str]:
        cmd = [sys.executable, "-m", "roomcast", "node", "--host", "127.0.0.1", "--port", str(port),
               "--api-port", "0", "--node-id", f"bench-node-{index}", *NODE_FLAGS]
        if redis_url:
            cmd += ["--redis-url", redis_url, "--redis-prefix", prefix]
        return cmd + extra

    return _start(f"node-{index}", "node", argv, logdir, READY_PROBE, b"HTTP/1.1 200", timeout)


def start_redis(logdir: Path, timeout: float) -> ServerProcess:
    binary = find_binary("redis-server")
    if binary is None:
        raise StartError("redis-server is not installed (apt-get install redis-server)")

    def argv(port: int) -> list[str]:
        return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"]

    return _start("redis", "redis", argv, logdir, b"PING\r\n", b"+PONG", timeout)


def _deploy(
    target: str, dialect: str, count: int, path: str, logdir: Path, timeout: float,
    cluster: bool, start_one: Callable[[int, str | None], ServerProcess],
) -> Deployment:
    """``start_one(index, redis_url)`` for ``count`` processes sharing a fresh redis-server
    (``cluster``), or for one without Redis; every process started is stopped if one fails.
    Subscribers spread over the processes' ``ws://127.0.0.1:PORT<path>``."""
    started: list[ServerProcess] = []
    try:
        redis_url = shared_redis(started, logdir, timeout) if cluster else None
        for index in range(count if cluster else 1):
            started.append(start_one(index, redis_url))
    except BaseException:
        Deployment("", dialect, [], "", started).stop()
        raise
    procs = [p for p in started if p.role != "redis"]
    urls = [f"ws://127.0.0.1:{p.port}{path}" for p in procs]
    return Deployment(target, dialect, urls, urls[0], started, idle_pid=procs[0].pid)


def _with_redis(cmd: list[str], redis_url: str | None) -> list[str]:
    return cmd + (["--redis-url", redis_url] if redis_url else [])


def start_reference(processes: int, logdir: Path, timeout: float, cluster: bool,
                    backlog: int) -> Deployment:
    """The bare reference: one process, or ``processes`` sharing a fresh redis-server (the
    bare cluster a roomcast cluster is measured beside)."""

    def start_one(index: int, redis_url: str | None) -> ServerProcess:
        def argv(port: int) -> list[str]:
            return _with_redis([sys.executable, "-m", "loadtest.reference_server", "--port",
                                str(port), "--backlog", str(backlog)], redis_url)

        name = f"reference-{index}" if cluster else "reference"
        return _start(name, "reference", argv, logdir, b"", b"", timeout)

    target = "reference-cluster" if cluster else "reference"
    return _deploy(target, "reference", processes, "/", logdir, timeout, cluster, start_one)


def shared_redis(started: list[ServerProcess], logdir: Path, timeout: float) -> str:
    """Start a fresh redis-server for a deployment's processes, add it to ``started`` (so that
    a failed start stops it too) and return its URL."""
    redis = start_redis(logdir, timeout)
    started.append(redis)
    return f"redis://127.0.0.1:{redis.port}/0"


def start_roomcast(
    nodes: int, logdir: Path, extra: list[str], timeout: float, cluster: bool
) -> Deployment:
    """One embedded node, or ``nodes`` nodes sharing a fresh redis-server (a unique prefix)."""
    prefix = f"bench-{secrets.token_hex(3)}"

    def start_one(index: int, redis_url: str | None) -> ServerProcess:
        return start_node(index, logdir, redis_url, extra, timeout, prefix)

    target = "roomcast-cluster" if cluster else "roomcast-embedded"
    return _deploy(target, "native", nodes, "/ws", logdir, timeout, cluster, start_one)


def start_socketio(
    processes: int, logdir: Path, timeout: float, cluster: bool, node_modules: Path,
    backlog: int,
) -> Deployment:
    """``processes`` socket.io servers sharing a fresh redis-server, or one without Redis.

    ``node_modules`` is the npm cache of npmcache.ensure_installed (given to Node as NODE_PATH).
    """
    node = find_binary("node")
    if node is None:
        raise StartError("node is not installed (--socketio needs Node.js 18+)")
    env = {"NODE_PATH": str(node_modules), "NODE_ENV": "production"}

    def start_one(index: int, redis_url: str | None) -> ServerProcess:
        def argv(port: int) -> list[str]:
            return _with_redis([node, str(SOCKETIO_SERVER), "--host", "127.0.0.1", "--port",
                                str(port), "--backlog", str(backlog)], redis_url)

        return _start(f"socketio-{index}", "socketio", argv, logdir, READY_PROBE,
                      b"HTTP/1.1 200", timeout, env)

    target = "socketio-cluster" if cluster else "socketio"
    return _deploy(target, "socketio", processes, sio.PATH, logdir, timeout, cluster, start_one)


def external(urls: list[str], dialect: str, pids: list[int]) -> Deployment:
    """Servers the bench did not start: measured only through the PIDs given."""
    return Deployment("url", dialect, urls, urls[0], [], list(pids),
                      idle_pid=pids[0] if pids else None)
