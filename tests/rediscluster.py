"""A real multi-shard Redis Cluster on loopback for the tests: masters, replicas and failover.

Every node is a redis-server process on a free port (with its cluster-bus port, +10000, free
too), started with ``subprocess.Popen`` and stopped by PID; ``redis-cli --cluster create``
assigns the slots and the replicas; every wait polls under a deadline.

    with RedisCluster(masters=3, replicas=1) as cluster:
        killed = cluster.kill_master(0)
        promoted = cluster.wait_failover(killed)

A node's files (its ``nodes-<port>.conf`` and log) live in one temporary directory per cluster,
removed on stop.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from roomcast.tools.procs import find_binary, free_port

#: Redis Cluster listens on port + 10000 for its bus: the client port must leave room for it.
MAX_CLUSTER_PORT = 65535 - 10000
SLOTS = 16384
#: Short, so that a dead master is detected (and its replica promoted) within a few seconds.
NODE_TIMEOUT_MS = 1000
POLL = 0.05


def cluster_port(taken: Collection[int] = ()) -> int:
    """A free port whose cluster-bus port (+10000) exists and is free too; neither it nor its
    bus port collides with a port of ``taken`` (client ports already handed out) or theirs."""
    reserved = {*taken, *(port + 10000 for port in taken)}
    for _ in range(200):
        port = free_port()
        if port > MAX_CLUSTER_PORT or port in reserved or port + 10000 in reserved:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no port with a free cluster-bus port")


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES: a node as some node of the cluster sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        """Flagged as failed (FAIL) or suspected (PFAIL, shown as ``fail?``)."""
        return bool(self.flags & {"fail", "fail?", "noaddr"})


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """CLUSTER NODES' reply, one NodeView per line; slots being migrated (``[...]``) skipped.

    Line format (https://redis.io/commands/cluster-nodes/): ``<id> <ip:port@cport[,hostname]>
    <flags> <master> <ping-sent> <pong-recv> <config-epoch> <link-state> <slot> ...``
    """
    views = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        slots = []
        for item in fields[8:]:
            if item.startswith("["):
                continue
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        views.append(NodeView(
            node_id=fields[0], port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
            flags=frozenset(fields[2].split(",")),
            master_id=None if fields[3] == "-" else fields[3], slots=tuple(slots),
        ))
    return views


def parse_info(text: str) -> dict[str, str]:
    """``key:value`` lines (CLUSTER INFO, INFO) as a dict; ``#`` headers skipped."""
    pairs = (line.partition(":") for line in text.splitlines() if not line.startswith("#"))
    return {key: value.strip() for key, sep, value in pairs if sep}


@dataclass(eq=False)
class RedisNode:
    """One redis-server of a RedisCluster. ``node_id``, ``role`` and ``master_id`` are as the
    cluster last reported them (RedisCluster refreshes them); ``pid`` is the process's."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    role: str = "master"
    master_id: str | None = None
    slots: tuple[tuple[int, int], ...] = ()
    paused: bool = False
    _client: redis.Redis | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    @property
    def alive(self) -> bool:
        """The process runs (paused or not)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def responsive(self) -> bool:
        """The process runs and is not paused: it can be asked something."""
        return self.alive and not self.paused

    def owns(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)

    def client(self) -> redis.Redis:
        """A plain client of this node alone (no redirects followed), short timeouts and no
        retries (redis-py's default retries with backoff would stretch every poll); closed by
        the cluster's stop."""
        if self._client is None:
            self._client = redis.Redis(
                port=self.port, socket_timeout=2, socket_connect_timeout=1, decode_responses=True,
                retry=Retry(NoBackoff(), 0))
        return self._client

    def command(self, *args: str | int) -> Any:
        """One command on this node alone (client()). A subcommand's reply is not parsed by
        redis-py (its callbacks are keyed by the whole name): CLUSTER NODES gives the text."""
        return self.client().execute_command(*args)  # type: ignore[no-untyped-call]  # unannotated in redis-py

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    def __repr__(self) -> str:
        state = "paused" if self.paused else "alive" if self.alive else "dead"
        slots = ",".join(f"{first}-{last}" for first, last in self.slots)
        pid = self.proc.pid if self.proc is not None else None
        return (f"RedisNode(port={self.port}, pid={pid}, {self.role}, {state}, "
                f"id={self.node_id[:8]}, slots={slots or '-'})")

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)


@dataclass(frozen=True)
class Failover:
    """How a wait_failover ended: ``how`` is ``automatic``, ``force`` or ``takeover``."""

    killed: RedisNode
    promoted: RedisNode
    seconds: float
    how: str


class RedisCluster:
    """``masters`` masters and ``replicas`` replicas of each, on loopback; ``start`` returns once
    every node reports ``cluster_state:ok``, all 16384 slots are assigned, every node agrees on
    who owns them and every replica's link to its master is up. ``stop`` is idempotent.

    Node-timeout is ``node_timeout_ms`` (1 s): a master that stops answering for that long is
    marked failed, and then the cluster is down (no replica) or fails over (replicas).

    ``nodes`` lists every node in creation order: the first ``masters`` are the masters
    redis-cli made, but it spreads the replicas over the masters in its own order, so ask
    ``replicas(of=master)`` rather than counting on ``nodes[masters + i]``.
    """

    def __init__(
        self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = NODE_TIMEOUT_MS
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        server, cli = find_binary("redis-server"), find_binary("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("redis-server or redis-cli is not installed (./dev test installs)")
        self.server_binary, self.cli_binary = server, cli
        self.master_count = masters
        self.replicas_per_master = replicas
        self.node_timeout_ms = node_timeout_ms
        self.workdir: Path | None = None
        self.nodes: list[RedisNode] = []
        self.last_failover: Failover | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> RedisCluster:
        """Start the processes, create the cluster and wait until it is healthy; on failure
        everything started is stopped again."""
        if self.workdir is not None:
            raise RuntimeError("this cluster is already started")
        deadline = time.monotonic() + timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="roomcast-rediscluster-"))
        try:
            total = self.master_count * (1 + self.replicas_per_master)
            self.nodes = []
            for _ in range(total):
                port = cluster_port(taken=[node.port for node in self.nodes])
                self.nodes.append(RedisNode(port=port, workdir=self.workdir))
            for node in self.nodes:
                self._launch(node)
            for node in self.nodes:
                self._until_pong(node, deadline)
            self._create(deadline)
            self.wait_healthy(timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, node: RedisNode) -> None:
        assert self.workdir is not None
        node.proc = subprocess.Popen(
            [self.server_binary, "--cluster-enabled", "yes",
             "--cluster-config-file", str(self.workdir / f"nodes-{node.port}.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms),
             # A replica tries to fail over however long it was cut off from its master.
             "--cluster-replica-validity-factor", "0",
             "--cluster-allow-reads-when-down", "no",
             "--port", str(node.port), "--bind", "127.0.0.1", "--protected-mode", "no",
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             # A replica's temporary RDB goes here, not into the tests' working directory.
             "--dir", str(self.workdir), "--logfile", str(node.log),
             # Sync a replica at once (the default waits 5 s for more replicas to join).
             "--repl-diskless-sync-delay", "0",
             # SIGTERM exits at once, without waiting for replicas to catch up (default 10 s).
             "--shutdown-timeout", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def _until_pong(self, node: RedisNode, deadline: float) -> None:
        """Wait for PING; a node whose port was taken meanwhile is started on another one."""
        for attempt in range(3):
            try:
                self._until(lambda: bool(node.client().ping()), deadline, f"PING from {node}",
                            watch=node)
                return
            except RuntimeError:  # It exited, most likely: its port was taken in the meantime.
                node.close_client()
                if attempt == 2:
                    raise
                node.port = cluster_port(taken=[other.port for other in self.nodes])
                self._launch(node)

    def _create(self, deadline: float) -> None:
        cmd = [self.cli_binary, "--cluster", "create", *(node.address for node in self.nodes),
               "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True,
                                    timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(
                f"redis-cli --cluster create did not finish: {exc.stdout!r}") from exc
        if result.returncode != 0 or f"All {SLOTS} slots covered" not in result.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed ({result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every process by PID, SIGKILL those still running after ``timeout``, remove
        the temporary directory. Harmless when called twice or after a failed start."""
        for node in self.nodes:
            node.close_client()
            if node.alive:
                node.signal(signal.SIGCONT)  # A stopped process handles SIGTERM only once resumed.
                node.paused = False
                node.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- topology ----------------------------------------------------------------------------

    @property
    def seed_url(self) -> str:
        """``redis://`` URL of the first created master, or of the first node still running
        once that one is killed: a cluster client's starting point."""
        for node in self.nodes:
            if node.responsive:
                return node.url
        raise RuntimeError("no node of the cluster is running")

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A redis-py cluster client starting from ``seed_url``; the caller closes it."""
        return redis.cluster.RedisCluster.from_url(self.seed_url, **kwargs)

    def masters(self) -> list[RedisNode]:
        """The masters that own slots and whose process runs (paused ones too), in slot order."""
        self.refresh()
        owners = [node for node in self.nodes if node.alive and node.role == "master"
                  and node.slots]
        return sorted(owners, key=lambda node: node.slots[0][0] if node.slots else SLOTS)

    def replicas(self, of: RedisNode | None = None) -> list[RedisNode]:
        """The replicas whose process runs; with ``of``, only that master's."""
        self.refresh()
        return [node for node in self.nodes if node.alive and node.role == "replica"
                and (of is None or node.master_id == of.node_id)]

    def master_of_slot(self, slot: int) -> RedisNode:
        """The master that owns ``slot`` in the cluster's current view."""
        for node in self.masters():
            if node.owns(slot):
                return node
        raise LookupError(f"no running master owns slot {slot}")

    def refresh(self) -> None:
        """Update every node's id, role, master and slots from a responsive node's view."""
        by_port = {node.port: node for node in self.nodes}
        asked = next((node for node in self.nodes if node.responsive), None)
        if asked is None:
            raise RuntimeError("no node of the cluster is running")
        for view in self._view(asked):
            node = by_port.get(view.port)
            if node is not None:
                node.node_id = view.node_id
                node.role = "master" if view.is_master else "replica"
                node.master_id = view.master_id
                node.slots = view.slots

    def _view(self, node: RedisNode) -> list[NodeView]:
        return parse_cluster_nodes(str(node.command("CLUSTER", "NODES")))

    def _pick(self, which: int | RedisNode) -> RedisNode:
        """A running master: by index in masters() order, by port, or itself."""
        if isinstance(which, RedisNode):
            return which
        masters = self.masters()
        if 0 <= which < len(masters):
            return masters[which]
        for node in masters:
            if node.port == which:
                return node
        raise LookupError(f"no running master with index or port {which}: {masters}")

    # -- health ------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Every responsive node: cluster_state:ok, all slots assigned, knows every node, and
        has the same slot owners and the same replica of whom as the others (refresh() asks
        one node: a replica it did not know to follow its master yet had none to promote),
        each owner a responsive node no one flags failing; every responsive replica's link to
        its master is up."""
        live = [node for node in self.nodes if node.responsive]
        views = {}
        for node in live:
            info = parse_info(str(node.command("CLUSTER", "INFO")))
            if (info.get("cluster_state") != "ok"
                    or info.get("cluster_slots_assigned") != str(SLOTS)
                    or info.get("cluster_known_nodes") != str(len(self.nodes))):
                return False
            views[node.port] = self._view(node)
            node.node_id = next(view.node_id for view in views[node.port]
                                if "myself" in view.flags)
        live_ids = {node.node_id for node in live}
        owners = [{(view.node_id, view.slots) for view in seen if view.slots}
                  for seen in views.values()]
        if not owners or any(mine != owners[0] for mine in owners):
            return False  # Not every node has heard of the latest slot owners yet.
        follows = [{(view.node_id, view.master_id) for view in seen} for seen in views.values()]
        if any(mine != follows[0] for mine in follows):
            return False  # Nor of every replica's master.
        if not {owner for owner, _ in owners[0]} <= live_ids:
            return False
        for node in live:
            if any(view.failing for view in views[node.port] if view.node_id in live_ids):
                return False
            myself = next(view for view in views[node.port] if "myself" in view.flags)
            if not myself.is_master and (
                    node.client().info("replication").get("master_link_status") != "up"):
                return False
        return True

    def wait_healthy(self, timeout: float = 15.0) -> None:
        """Poll healthy() until true, then refresh(); TimeoutError after ``timeout`` seconds."""
        self._until(self.healthy, time.monotonic() + timeout, "a healthy cluster")
        self.refresh()

    def _until(
        self, check: Callable[[], bool], deadline: float, what: str,
        watch: RedisNode | None = None,
    ) -> None:
        """Poll ``check`` (a connection error counts as false) until true; TimeoutError at
        ``deadline``, RuntimeError if the ``watch`` node's process exits."""
        while True:
            if watch is not None and not watch.alive:
                raise RuntimeError(f"redis-server {watch} exited: {watch.log_tail()}")
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if check():
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {node.port}\n{node.log_tail(600)}" for node in self.nodes)
                raise TimeoutError(f"redis cluster: no {what}\n{logs}")
            time.sleep(POLL)

    # -- faults ------------------------------------------------------------------------------

    def kill_master(self, which: int | RedisNode) -> RedisNode:
        """SIGKILL a running master by PID (``which``: index in masters() order, or its port,
        or the node) and return it; the cluster still lists it, as failed once noticed."""
        node = self._pick(which)
        self.replicas()  # Records which replicas follow it, for wait_failover.
        assert node.proc is not None
        node.proc.kill()
        node.proc.wait(timeout=10)
        node.close_client()
        node.paused = False
        return node

    def wait_failover(self, killed: RedisNode, timeout: float = 15.0) -> RedisNode:
        """Wait until a replica of ``killed`` is a master and the surviving nodes are healthy
        (see healthy()); return the promoted replica. ``last_failover`` says how long it took
        and whether it was automatic.

        Automatic failover takes about node-timeout to suspect the master, a moment for the
        other masters' failure reports to make it FAIL, then the replica's election delay
        (500 ms + up to 500 ms random + 1 s per rank): about 2-3 s here. If no replica is
        master after 5 node-timeouts, ``CLUSTER FAILOVER FORCE`` is sent to one (an election
        without the dead master's consent, still needing a majority of masters); 3 node-timeouts
        later still nothing, ``CLUSTER FAILOVER TAKEOVER`` (no election at all)."""
        candidates = [node for node in self.nodes
                      if node.responsive and node.master_id == killed.node_id]
        if not candidates:
            raise ValueError(f"{killed} has no running replica to promote")
        started = time.monotonic()
        deadline = started + timeout
        escalations = [(started + 5 * self.node_timeout_ms / 1000, "force"),
                       (started + 8 * self.node_timeout_ms / 1000, "takeover")]
        how = "automatic"
        promoted: list[RedisNode] = []

        def promotion() -> bool:
            nonlocal how
            for node in candidates:
                if node.client().info("replication").get("role") == "master":
                    promoted.append(node)
                    return True
            if escalations and time.monotonic() >= escalations[0][0]:
                _, how = escalations.pop(0)
                with contextlib.suppress(redis.ResponseError):
                    candidates[0].command("CLUSTER", "FAILOVER", how.upper())
            return False

        self._until(promotion, deadline, f"promotion of a replica of {killed}")
        self.wait_healthy(timeout=max(0.0, deadline - time.monotonic()))
        self.last_failover = Failover(killed, promoted[0], time.monotonic() - started, how)
        return promoted[0]

    def pause_master(self, which: int | RedisNode) -> RedisNode:
        """SIGSTOP a running master (as pick: index, port or node): it holds its connections
        but answers nothing, like a stalled host. Past node-timeout the cluster notices."""
        node = self._pick(which)
        self.replicas()  # Records which replicas follow it, for wait_failover.
        node.signal(signal.SIGSTOP)
        node.paused = True
        return node

    def resume(self, node: RedisNode, timeout: float = 15.0) -> None:
        """SIGCONT a paused node, then wait_healthy (the cluster may have failed over meanwhile,
        in which case the node comes back as a replica)."""
        node.signal(signal.SIGCONT)
        node.paused = False
        self.wait_healthy(timeout)

    def restart(self, node: RedisNode, timeout: float = 15.0) -> None:
        """Start a killed node again on its port, with its nodes-<port>.conf (so its node id),
        and wait_healthy: a master that was failed over comes back as a replica of the new one,
        its data replaced by a full sync."""
        if node.alive:
            raise ValueError(f"{node} is still running")
        deadline = time.monotonic() + timeout
        self._launch(node)
        self._until(lambda: bool(node.client().ping()), deadline, f"PING from {node}", watch=node)
        self.wait_healthy(timeout=max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def running_cluster(masters: int = 3, replicas: int = 0) -> Iterator[RedisCluster]:
    """A started RedisCluster for a fixture, stopped by PID afterwards; a clear failure when
    redis-server or redis-cli is missing (the README test command installs them)."""
    if find_binary("redis-server") is None or find_binary("redis-cli") is None:
        import pytest

        pytest.fail("redis-server is not installed: run the README test command (./dev test)")
    with RedisCluster(masters=masters, replicas=replicas) as cluster:
        yield cluster
