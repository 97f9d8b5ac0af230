"""A local cluster: redis-server, N roomcast nodes and nginx, started and stopped together.

``roomcast cluster up`` owns every process (each in its own session, so a Ctrl-C reaches only
``up``, which then stops them in order: nodes drain first, then nginx, then Redis). Its state file
(``<dir>/state.json``: PIDs, ports, paths, the last rolling restart's progress) is how a second
terminal talks to it: ``roomcast cluster restart`` sends ``up`` SIGUSR1 and follows the progress
that ``up`` writes there. ``LocalCluster`` is the same machinery as a Python API for tests.

``roomcast drain URL`` asks one node to drain (POST /admin/drain on its internal port, with the
admin token).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roomcast import config as config_module
from roomcast.tools.balancer import Balancer, BalancerError, ensure_dev_certificate, stop_process
from roomcast.tools.procs import find_binary, free_port

STATE_FILE = "state.json"
# Drain settings for local use (a production node waits 5 s, then closes over 10 s).
LOCAL_DRAIN_FLAGS = ("--drain-delay", "1", "--drain-window", "2")
# A draining node exits within delay + window + this: server.DRAIN_MARGIN (5 s) for the last
# closing handshakes, then shutdown's own bounded waits, plus slack for a loaded machine.
NODE_EXIT_MARGIN = 15.0
NODE_START_TIMEOUT = 15.0
READY_TIMEOUT = 10.0
REDIS_START_TIMEOUT = 10.0
# Flags `cluster up` sets on every node itself.
RESERVED_NODE_FLAGS = ("--host", "--port", "--api-port", "--redis-url", "--log-format")


class ClusterError(RuntimeError):
    """The cluster could not do what was asked; the message is one line for a user."""


class ClusterAborted(ClusterError):
    """A wait was cut short by ``abort()`` (Ctrl-C while starting or restarting)."""


@dataclass
class NodeInfo:
    """One node process of a local cluster."""

    seq: int
    pid: int
    log: Path
    port: int = 0
    #: The internal port: server API, /livez, /readyz, /metrics, /admin/drain.
    api_port: int = 0
    node_id: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logged(self, event: str | None = None) -> list[dict[str, Any]]:
        """The node's JSON log lines so far (only those with ``event``, when given)."""
        lines = []
        with contextlib.suppress(OSError):
            for raw in self.log.read_text(errors="replace").splitlines(keepends=True):
                if raw.endswith("\n") and raw.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        lines.append(json.loads(raw))
        return [line for line in lines if event is None or line.get("event") == event]

    def to_state(self) -> dict[str, Any]:
        return {"seq": self.seq, "pid": self.pid, "port": self.port, "api_port": self.api_port,
                "node_id": self.node_id, "log": str(self.log), "alive": self.alive}


def node_settings(node_flags: Sequence[str]) -> config_module.Config:
    """The settings nodes started with ``node_flags`` (and the environment) will have.

    Raises ValueError with a one-line message for an unknown, reserved or invalid flag.
    """
    flags = list(node_flags)
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in RESERVED_NODE_FLAGS:
            raise ValueError(f"node flag {name} is set by roomcast cluster itself")
    parser = argparse.ArgumentParser(prog="node flags", add_help=False)
    config_module.add_arguments(parser)
    namespace, unknown = parser.parse_known_args([*LOCAL_DRAIN_FLAGS, *flags])
    if unknown:
        raise ValueError(f"unknown node flag: {unknown[0]} (see roomcast node --help)")
    settings = config_module.load_config(namespace)
    if settings.log_level.lower() not in ("debug", "info"):
        raise ValueError("node flag --log-level must be debug or info: the cluster reads the "
                         "'node started' line")
    return settings


class LocalCluster:
    """redis-server, nodes and nginx on loopback, every process stopped by PID.

    ``with LocalCluster(tmp_dir).start(nodes=3) as cluster: ...``. Ports 0 are ephemeral. Every
    wait is bounded; ``abort()`` (from a signal handler) cuts a start or restart short.
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, *, http_port: int = 0,
        https_port: int = 0, redis_port: int = 0, cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
    ) -> None:
        if (cert is None) != (key is None):
            raise ValueError("give both a certificate and its key, or neither")
        if directory is None:
            directory = tempfile.mkdtemp(prefix="roomcast-cluster-")
        self.dir = Path(directory).resolve()
        self.state_path = self.dir / STATE_FILE
        self._ports = (http_port, https_port, redis_port)
        self._cert = None if cert is None else Path(cert).resolve()
        self._key = None if key is None else Path(key).resolve()
        self.ca_cert: Path | None = None
        self.nodes: list[NodeInfo] = []
        self.node_flags: list[str] = []
        self.drain_bound = 0.0
        self.balancer: Balancer | None = None
        self.redis_port = 0
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.up_pid: int | None = None  # Set by `cluster up`: the process `restart` signals.
        self.restart: dict[str, Any] = {"id": 0, "status": "idle", "progress": [], "error": None}
        self._spawned: list[NodeInfo] = []
        self._seq = 0
        self._aborted = False
        self._hurried = False

    # --- addresses ---------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def http_url(self) -> str:
        return self._balancer().http_url

    @property
    def ws_url(self) -> str:
        return self._balancer().ws_url

    @property
    def wss_url(self) -> str:
        return self._balancer().wss_url

    def _balancer(self) -> Balancer:
        if self.balancer is None:
            raise ClusterError("the cluster is not started")
        return self.balancer

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, nodes: int = 3, node_flags: Iterable[str] = ()) -> LocalCluster:
        """Start Redis, ``nodes`` nodes (each also given ``node_flags``) and nginx.

        On any failure everything started so far is stopped and the error raised.
        """
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.node_flags = list(node_flags)
        settings = node_settings(self.node_flags)
        self.drain_bound = settings.drain_delay + settings.drain_window + NODE_EXIT_MARGIN
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            spawned = [self._spawn_node() for _ in range(nodes)]
            for info in spawned:
                self._wait_started(info)
            self.nodes = spawned
            if self._cert is not None and self._key is not None:
                cert, key = self._cert, self._key
            else:
                self.ca_cert, cert, key = ensure_dev_certificate(self.dir / "certs")
            http_port, https_port, _ = self._ports
            self.balancer = Balancer(
                self.dir / "nginx", [n.port for n in self.nodes], cert=cert, key=key,
                http_port=http_port, https_port=https_port,
            ).start()
            self.write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, drain: bool = True) -> None:
        """Stop nodes (SIGTERM: they drain), then nginx, then Redis. Idempotent.

        ``drain=False`` (or ``hurry()`` during the stop) sends a second SIGTERM, on which a node
        closes its connections at once with 1001 instead of draining.
        """
        running = [n.proc for n in self._spawned if n.proc is not None and n.alive]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        first_sent = time.monotonic()
        deadline = first_sent + self.drain_bound
        second_sent = False
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            # The gap keeps the kernel from merging the two signals into one.
            if (self._hurried or not drain) and not second_sent and (
                time.monotonic() - first_sent > 0.2
            ):
                second_sent = True
                deadline = min(deadline, time.monotonic() + 5.0)
                for proc in running:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        for proc in running:
            stop_process(proc, None, 0)
        if self.balancer is not None:
            self.balancer.stop(timeout=5.0 if self._hurried else 10.0)
        if self.redis_proc is not None:
            stop_process(self.redis_proc, signal.SIGTERM, 5.0)
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    def abort(self) -> None:
        """Make a running ``start()`` or ``rolling_restart()`` give up (signal-handler safe)."""
        self._aborted = True

    def hurry(self) -> None:
        """Make a running ``stop()`` stop nodes at once (safe in a signal handler)."""
        self._hurried = True

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- operations --------------------------------------------------------------------------

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index`` (a crash). It stays in nginx's list; nginx routes around it."""
        info = self.nodes[index]
        if info.proc is not None and info.proc.poll() is None:
            info.proc.kill()
            info.proc.wait(timeout=10)
        self.write_state()

    def rolling_restart(self, on_progress: Callable[[str], None] | None = None) -> None:
        """Replace every node, one at a time, without refusing a client.

        For each node: start a replacement, wait for its /readyz, add it to nginx, SIGTERM the
        old node (it drains: 503 to handshakes, paced 1012 closes), wait for it to exit, remove
        it from nginx. ``on_progress`` gets one line per step; the state file records them.
        """
        balancer = self._balancer()
        self.restart = {"id": self.restart["id"] + 1, "status": "running", "progress": [],
                        "error": None}

        def say(line: str) -> None:
            self.restart["progress"].append(line)
            self.write_state()
            if on_progress is not None:
                on_progress(line)

        total = len(self.nodes)
        try:
            for number, old in enumerate(list(self.nodes), 1):
                step = f"node {number}/{total}"
                say(f"{step}: starting a replacement for {old.node_id} (port {old.port})")
                new = self._spawn_node()
                self._wait_started(new)
                self._wait_ready(new)
                self.nodes.append(new)
                balancer.reload([n.port for n in self.nodes])
                doing = "draining" if old.alive else "removing the exited"
                say(f"{step}: {new.node_id} is ready on port {new.port}; "
                    f"{doing} {old.node_id}")
                began = time.monotonic()
                code = self._stop_node(old)
                self.nodes.remove(new)
                self.nodes[self.nodes.index(old)] = new
                balancer.reload([n.port for n in self.nodes])
                say(f"{step}: {old.node_id} exited with {code} after "
                    f"{time.monotonic() - began:.1f} s; {new.node_id} took its place")
        except BaseException as exc:
            aborted = isinstance(exc, ClusterAborted | KeyboardInterrupt)
            self.restart.update(status="aborted" if aborted else "failed", error=str(exc))
            self.write_state()
            raise
        self.restart["status"] = "done"
        self.write_state()

    def restart_timeout(self) -> float:
        """A bound on one rolling restart: per node a start, a readiness wait, two reloads and
        a drain."""
        return len(self.nodes) * (NODE_START_TIMEOUT + READY_TIMEOUT + 20.0 + self.drain_bound)

    # --- state file --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What the state file holds: PIDs, ports, URLs and paths, and the last restart."""
        balancer = self.balancer
        return {
            "version": 1,
            "up_pid": self.up_pid,
            "dir": str(self.dir),
            "urls": None if balancer is None else {
                "ws": balancer.ws_url, "wss": balancer.wss_url, "http": balancer.http_url,
            },
            "ca_cert": None if self.ca_cert is None else str(self.ca_cert),
            "redis": {"pid": None if self.redis_proc is None else self.redis_proc.pid,
                      "port": self.redis_port, "url": self.redis_url},
            "balancer": None if balancer is None else {
                "pid": balancer.pid, "http_port": balancer.http_port,
                "https_port": balancer.https_port, "rundir": str(balancer.rundir),
                "conf": str(balancer.conf),
            },
            "nodes": [n.to_state() for n in self.nodes],
            "node_flags": self.node_flags,
            "restart_timeout": self.restart_timeout(),
            "restart": self.restart,
        }

    def write_state(self) -> None:
        """Replace the state file atomically (a reader never sees half of it)."""
        partial = self.state_path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.state(), indent=2) + "\n")
        os.replace(partial, self.state_path)

    # --- processes ---------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        if self._aborted:
            raise ClusterAborted("interrupted")
        time.sleep(seconds)

    def _start_redis(self) -> None:
        binary = find_binary("redis-server")
        if binary is None:
            raise ClusterError("redis-server is not installed (Debian/Ubuntu: apt-get install "
                               "redis-server)")
        wanted = self._ports[2]
        for attempt in range(3):
            self.redis_port = wanted or free_port()
            log = self.dir / "redis.log"
            self.redis_proc = subprocess.Popen(
                [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                 "--logfile", str(log), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_redis():
                return
            text = log.read_text(errors="replace") if log.exists() else ""
            stop_process(self.redis_proc, signal.SIGTERM, 5.0)
            if "Address already in use" not in text or wanted or attempt == 2:
                last = (text.strip().splitlines() or ["no log"])[-1]
                raise ClusterError(f"redis-server did not start on port {self.redis_port}: "
                                   f"{last}")

    def _wait_redis(self) -> bool:
        assert self.redis_proc is not None
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while time.monotonic() < deadline and self.redis_proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.redis_port), timeout=0.5
            ) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return True
            self._sleep(0.02)
        return False

    def _spawn_node(self) -> NodeInfo:
        self._seq += 1
        log = self.dir / "nodes" / f"node-{self._seq}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [
            # -P: a "node" directory in the current directory must not shadow the package.
            sys.executable, "-P", "-m", "roomcast", "node", "--host", "127.0.0.1", "--port", "0",
            "--api-port", "0", "--redis-url", self.redis_url, "--log-format", "json",
            "--log-level", "info",
            "--trusted-proxies", "127.0.0.1", *LOCAL_DRAIN_FLAGS, *self.node_flags,
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )
        info = NodeInfo(seq=self._seq, pid=proc.pid, log=log, proc=proc)
        self._spawned.append(info)
        return info

    def _wait_started(self, info: NodeInfo) -> None:
        """Wait for the node's 'node started' log line and take its port and node id."""
        assert info.proc is not None
        deadline = time.monotonic() + NODE_START_TIMEOUT
        while True:
            started = info.logged("node started")
            if started:
                info.port = int(started[0]["port"])
                info.api_port = int(started[0]["api_port"])
                info.node_id = str(started[0].get("node_id", f"node-{info.seq}"))
                return
            if info.proc.poll() is not None:
                tail = info.log.read_text(errors="replace").strip().splitlines()
                raise ClusterError(f"node {info.seq} exited with {info.proc.returncode}: "
                                   f"{tail[-1] if tail else 'no output'}")
            if time.monotonic() > deadline:
                raise ClusterError(f"node {info.seq} did not start within "
                                   f"{NODE_START_TIMEOUT:g} s (log: {info.log})")
            self._sleep(0.05)

    def _wait_ready(self, info: NodeInfo) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(
                f"{info.http_url}/readyz", timeout=1
            ) as reply:
                if reply.status == 200:
                    return
            if not info.alive:
                raise ClusterError(f"node {info.node_id} exited before it was ready")
            if time.monotonic() > deadline:
                raise ClusterError(f"node {info.node_id} was not ready within "
                                   f"{READY_TIMEOUT:g} s")
            self._sleep(0.05)

    def _stop_node(self, info: NodeInfo) -> int:
        """SIGTERM (a drain) and wait for the exit, bounded by the drain settings."""
        if info.proc is None:
            return 0
        if info.proc.poll() is not None:
            return info.proc.returncode
        info.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_bound
        while info.proc.poll() is None and time.monotonic() < deadline:
            self._sleep(0.05)
        return stop_process(info.proc, None, 0)


# --- the commands ----------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cluster up``, ``cluster restart`` and ``drain`` to the ``roomcast`` subparsers."""
    cluster = sub.add_parser(
        "cluster", help="run a local cluster: redis-server, nodes and nginx",
        description="A cluster on this machine for development and load tests: redis-server, "
        "roomcast nodes and nginx (ws://, wss:// with a local development CA, http://), all on "
        "127.0.0.1.",
    )
    actions = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    up = actions.add_parser(
        "up", help="start the cluster and keep it running until Ctrl-C",
        description="Start redis-server, --nodes nodes and nginx; print the URLs; stop "
        "everything on Ctrl-C or SIGTERM (nodes drain first). Node flags go after '--', e.g. "
        "roomcast cluster up --nodes 3 -- --drain-delay 3 --rate-limit 100. Nodes get "
        f"{' '.join(LOCAL_DRAIN_FLAGS)} unless given other values.",
    )
    up.add_argument("--nodes", type=_positive_int, default=3, metavar="N",
                    help="how many nodes to run (default: 3)")
    up.add_argument("--http-port", type=_port, default=0, metavar="PORT",
                    help="nginx port for ws:// and http:// (default: 0, a free port)")
    up.add_argument("--https-port", type=_port, default=0, metavar="PORT",
                    help="nginx port for wss:// and https:// (default: 0, a free port)")
    up.add_argument("--redis-port", type=_port, default=0, metavar="PORT",
                    help="redis-server port (default: 0, a free port)")
    up.add_argument("--cert", metavar="PEM",
                    help="TLS certificate for wss:// (default: a local development CA's, made "
                    "in DIR/certs)")
    up.add_argument("--key", metavar="PEM", help="the private key of --cert")
    _add_dir(up)
    up.add_argument("--node-flag", action="append", default=[], metavar="FLAG",
                    help="a flag for every node, repeatable; write it with '=' "
                    "(--node-flag=--rate-limit=100), or put node flags after '--'")
    up.add_argument("node_args", nargs="*", metavar="-- NODE_FLAGS",
                    help="flags for every node (see roomcast node --help)")
    up.set_defaults(func=up_main)

    restart = actions.add_parser(
        "restart", help="replace the running cluster's nodes one at a time",
        description="Rolling restart of the cluster that `roomcast cluster up` runs from DIR: "
        "for each node, start a replacement, wait until it is ready, add it to nginx, drain "
        "the old node, remove it from nginx. Prints one line per step. Exit 0 when every node "
        "was replaced, 1 with a one-line error otherwise.",
    )
    _add_dir(restart)
    restart.add_argument("--timeout", type=float, metavar="SECONDS",
                         help="give up after this long (default: from the nodes' drain "
                         "settings)")
    restart.set_defaults(func=restart_main)

    drain = sub.add_parser(
        "drain", help="ask one node to drain (POST /admin/drain)",
        description="POST /admin/drain to one node's internal port (--api-port, never the "
        "balancer's) and "
        "print its JSON reply. The node must run with --admin-token. Exit 0 when the node "
        "accepted, 1 with a one-line error otherwise.",
    )
    drain.add_argument("url", metavar="URL", help="the node's internal address, e.g. "
                       "http://127.0.0.1:9000")
    drain.add_argument("--token", help="the node's --admin-token (default: the "
                       "ROOMCAST_ADMIN_TOKEN environment variable)")
    drain.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                       help="HTTP timeout (default: 10)")
    drain.set_defaults(func=drain_main)


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=".cluster", metavar="DIR",
                        help="where the state file, logs, nginx files and the development CA "
                        "live (default: .cluster)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535: {text}")
    return value


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"roomcast {command}: {message}", file=sys.stderr, flush=True)
    return code


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state file of the cluster in ``directory``, or None when there is none."""
    try:
        state: dict[str, Any] = json.loads((Path(directory) / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state


def _is_up_process(pid: object) -> bool:
    """True when ``pid`` is a live `roomcast cluster up` (not a recycled PID)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # No /proc: trust the PID.
    return b"cluster" in argv and b"up" in argv


def up_main(args: argparse.Namespace) -> int:
    """``roomcast cluster up``: start, print the URLs, run until a signal, stop, exit 0."""
    if (args.cert is None) != (args.key is None):
        return _fail("cluster up", "give both --cert and --key, or neither", 2)
    node_flags = [*args.node_flag, *args.node_args]
    try:
        node_settings(node_flags)
    except ValueError as exc:
        return _fail("cluster up", str(exc), 2)
    running = read_state(args.dir)
    if running is not None and _is_up_process(running.get("up_pid")):
        return _fail("cluster up", f"a cluster already runs from {args.dir} (pid "
                     f"{running['up_pid']}); stop it first (Ctrl-C in its terminal)")
    cluster = LocalCluster(args.dir, http_port=args.http_port, https_port=args.https_port,
                           redis_port=args.redis_port, cert=args.cert, key=args.key)
    cluster.up_pid = os.getpid()
    requests = {"stop": 0, "restart": False}

    def on_stop(signum: int, frame: object) -> None:
        requests["stop"] += 1
        cluster.abort()
        if requests["stop"] > 1:
            cluster.hurry()

    def on_restart(signum: int, frame: object) -> None:
        requests["restart"] = True

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGUSR1, on_restart)
    print(f"starting redis-server, {args.nodes} node(s) and nginx in {cluster.dir} ...",
          flush=True)
    try:
        cluster.start(args.nodes, node_flags)
    except ClusterAborted:
        print("stopped before the cluster was up", flush=True)
        return 0
    except (ClusterError, BalancerError, ValueError, OSError) as exc:
        return _fail("cluster up", str(exc))
    print(summary(cluster), flush=True)
    reported: set[int] = set()
    while not requests["stop"]:
        if requests["restart"]:
            print("rolling restart requested", flush=True)
            try:
                cluster.rolling_restart(lambda line: print(line, flush=True))
                print("rolling restart done", flush=True)
                print(node_table(cluster), flush=True)
            except ClusterAborted:
                break
            except (ClusterError, BalancerError, OSError) as exc:
                print(f"rolling restart failed: {exc}", file=sys.stderr, flush=True)
            requests["restart"] = False
        for info in cluster.nodes:
            if info.seq not in reported and info.proc is not None and not info.alive:
                reported.add(info.seq)
                print(f"warning: node {info.node_id} (pid {info.pid}) exited with "
                      f"{info.proc.returncode}; see {info.log}", file=sys.stderr, flush=True)
                cluster.write_state()
        time.sleep(0.2)
    print("stopping: nodes drain first (Ctrl-C again to stop them at once) ...", flush=True)
    cluster.stop()
    print("stopped", flush=True)
    return 0


def summary(cluster: LocalCluster) -> str:
    """The URL table `cluster up` prints once everything answers."""
    balancer = cluster._balancer()
    trust = f"   (trust the dev CA {cluster.ca_cert})" if cluster.ca_cert else ""
    return "\n".join([
        f"roomcast cluster is up: {len(cluster.nodes)} node(s) behind nginx",
        "",
        f"  ws     {balancer.ws_url}",
        f"  wss    {balancer.wss_url}{trust}",
        f"  http   {balancer.http_url}/",
        f"  redis  {cluster.redis_url}",
        "",
        node_table(cluster),
        "",
        f"state: {cluster.state_path}",
        "Ctrl-C stops everything; `roomcast cluster restart --dir "
        f"{cluster.dir}` replaces the nodes one at a time.",
    ])


def node_table(cluster: LocalCluster) -> str:
    rows = [("node", "pid", "port", "api port", "log")]
    rows += [(n.node_id, str(n.pid), str(n.port), str(n.api_port), str(n.log))
             for n in cluster.nodes]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  " + row[4]
        for row in rows
    )


def restart_main(args: argparse.Namespace) -> int:
    """``roomcast cluster restart``: signal `cluster up` and print its progress."""
    command = "cluster restart"
    state = read_state(args.dir)
    if state is None:
        return _fail(command, f"no cluster state in {args.dir}; is `roomcast cluster up "
                     f"--dir {args.dir}` running?")
    up_pid = state.get("up_pid")
    if not _is_up_process(up_pid):
        return _fail(command, f"the `roomcast cluster up` of {args.dir} (pid {up_pid}) is not "
                     "running")
    assert isinstance(up_pid, int)
    if state["restart"]["status"] == "running":
        return _fail(command, "a rolling restart is already running")
    before = int(state["restart"]["id"])
    timeout = args.timeout or float(state["restart_timeout"])
    os.kill(up_pid, signal.SIGUSR1)
    started = time.monotonic()
    printed = 0
    while True:
        time.sleep(0.1)
        state = read_state(args.dir)
        if state is None or not _is_up_process(up_pid):
            return _fail(command, "the cluster stopped during the restart")
        restart = state["restart"]
        elapsed = time.monotonic() - started
        if int(restart["id"]) <= before:
            if elapsed > 10:
                return _fail(command, f"`cluster up` (pid {up_pid}) did not begin the "
                             "restart within 10 s")
            continue
        for line in restart["progress"][printed:]:
            print(line, flush=True)
        printed = len(restart["progress"])
        if restart["status"] == "done":
            print(f"rolling restart done in {elapsed:.1f} s", flush=True)
            return 0
        if restart["status"] in ("failed", "aborted"):
            return _fail(command, f"rolling restart {restart['status']}: {restart['error']}")
        if elapsed > timeout:
            return _fail(command, f"stopped following after {timeout:g} s; `cluster up` "
                         "carries on with the restart (see its output)")


def drain_main(args: argparse.Namespace) -> int:
    """``roomcast drain URL``: POST /admin/drain with the bearer token; print the reply."""
    token = args.token or os.environ.get("ROOMCAST_ADMIN_TOKEN")
    if not token:
        return _fail("drain", "give --token or set ROOMCAST_ADMIN_TOKEN", 2)
    base = args.url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return _fail("drain", f"URL must start with http:// or https://: {args.url}", 2)
    target = base if base.endswith("/admin/drain") else base + "/admin/drain"
    request = urllib.request.Request(
        target, data=b"", method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, TypeError, KeyError):
            raw = json.loads(raw)["error"]["message"]  # The internal port's error body.
        detail = " ".join(str(raw).split())[:200]
        hint = " (admin is on the node's internal port, --api-port: use that address)" \
            if exc.code == 404 and "admin endpoints are disabled" not in detail else ""
        return _fail("drain", f"{target}: HTTP {exc.code} {exc.reason}: {detail}{hint}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return _fail("drain", f"cannot reach {target}: {reason}")
    try:
        reply_json = json.loads(body)
    except json.JSONDecodeError:
        return _fail("drain", f"{target}: the reply is not JSON: {body[:100]!r}")
    print(json.dumps(reply_json), flush=True)
    return 0
