"""The kubelet, rehearsed against real processes: what the rendered production Deployment
declares is what happens to a 2-pod cluster on loopback with real Redis and nginx.

Each pod is the node container as the kubelet would start it: the image's ENTRYPOINT (tini, when
installed here, then ``roomcast node``) with the container's environment (ConfigMap, Secret
reference), its ConfigMap and Secret volumes written to a temp directory standing in for their
mount paths, and the image's virtualenv standing for this interpreter's. Only what a pod has of
its own is changed: each gets loopback ports of its own (the probes' named ports follow), and
the drain timings are the dev overlay's so that the run stays short. Probes run exactly as
declared (path, port, period, timeout, thresholds; startup first), a stand-in endpoint
controller points nginx at the ready pods after a propagation delay, and a pod's deletion is
what the kubelet does: preStop, then SIGTERM when it returns, then SIGKILL at the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from roomcast import config as config_module
from roomcast.tools.balancer import Balancer, ensure_dev_certificate
from roomcast.tools.client import Client, ClientError
from roomcast.tools.procs import free_port
from tests.harness import RedisServer, running_redis, wait_for
from tests.test_k8s import (
    TEST_SECRETS,
    container_env,
    descendants,
    dockerfile,
    drain_bound,
    find,
    image_command,
    image_env,
    map_paths,
    mount_volumes,
    node_container,
    port_number,
    prepare_tree,
    render,
)

#: The image's virtualenv (Dockerfile: /opt/roomcast) is the one running these tests.
IMAGE_PATHS = {"/opt/roomcast": sys.prefix}
#: PID 1's stdout is the container log; the hook appends its lines there (deployment.yaml).
CONTAINER_STDOUT = "/proc/1/fd/1"
#: Seconds between a pod's readiness changing and nginx sending traffic by it (kube-dns TTL and
#: nginx's resolver in a cluster; a reload of the local nginx here).
PROPAGATION = 1.0
ROOM = "rehearsal"
SUBSCRIBERS = 20
RATE = 15.0  # publications per second, within the default --rate-limit of 20
MAX_MESSAGES = 3000  # the publisher's bound, far above what the run sends


@dataclass
class Probe:
    """One declared probe, as the kubelet runs it: an HTTP GET, success for 200-399."""

    kind: str
    path: str
    port: int
    period: float
    timeout: float
    failure_threshold: int
    success_threshold: int
    initial_delay: float

    @classmethod
    def declared(cls, kind: str, container: dict[str, Any], ports: dict[int, int]) -> Probe:
        spec = container[kind]
        get = spec["httpGet"]
        return cls(kind, get["path"], ports[port_number(container, get["port"])],
                   float(spec.get("periodSeconds", 10)), float(spec.get("timeoutSeconds", 1)),
                   int(spec.get("failureThreshold", 3)), int(spec.get("successThreshold", 1)),
                   float(spec.get("initialDelaySeconds", 0)))

    async def check(self, session: aiohttp.ClientSession) -> int | None:
        """The status, or None when nothing answered within the timeout."""
        try:
            async with session.get(f"http://127.0.0.1:{self.port}{self.path}",
                                   timeout=aiohttp.ClientTimeout(total=self.timeout)) as reply:
                return reply.status
        except (aiohttp.ClientError, TimeoutError):
            return None


@dataclass
class Termination:
    """What a pod's deletion looked like, in seconds from the deletion."""

    hook_exit: int
    hook_seconds: float
    hook_output: str
    exit_code: int
    exit_seconds: float
    #: (seconds after the deletion, status) of the first readiness probe sent after the hook
    #: returned.
    first_readiness: tuple[float, int | None] | None
    livez: list[int | None] = field(default_factory=list)


class Pod:
    """One node pod on loopback, started and probed the way the kubelet does."""

    def __init__(self, name: str, docs: list[dict[str, Any]], root: Path,
                 timings: dict[str, str]) -> None:
        self.name = name
        self.deployment = find(docs, "Deployment", "roomcast")
        container = node_container(self.deployment)
        self.dir = root / name
        self.log_path = self.dir / "container.log"
        mapped: dict[str, Path | str] = {**mount_volumes(docs, self.deployment, self.dir),
                                         **IMAGE_PATHS, CONTAINER_STDOUT: str(self.log_path)}
        self.client_port, self.api_port = free_port(), free_port()
        ports = {port_number(container, "client"): self.client_port,
                 port_number(container, "internal"): self.api_port}
        image = dockerfile()
        env = {**image_env(image, os.environ.get("PATH", "")),
               **{k: map_paths(v, mapped) for k, v in container_env(docs, container).items()}}
        # The pod's own addresses: loopback, ports of its own. The rest is the manifest's.
        env.update({"ROOMCAST_HOST": "127.0.0.1", "ROOMCAST_PORT": str(self.client_port),
                    "ROOMCAST_API_HOST": "127.0.0.1", "ROOMCAST_API_PORT": str(self.api_port),
                    **timings})
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env['PATH']}"
        self.env = env
        self.settings = config_module.load_config(None, env)
        self.command = [map_paths(part, mapped) for part in image_command(image)]
        if self.command[0] == "/usr/bin/tini":
            tini = shutil.which("tini")
            # Without tini here the node itself is the container's first process.
            self.command = [tini, *self.command[1:]] if tini else self.command[2:]
        assert "args" not in container and "command" not in container
        self.hook = [map_paths(part, mapped)
                     for part in container["lifecycle"]["preStop"]["exec"]["command"]]
        self.grace = float(self.deployment["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"])
        self.probes = {kind: Probe.declared(kind, container, ports)
                       for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = asyncio.Event()
        self.ready = False
        self.terminating = False
        self.results: list[tuple[float, str, int | None]] = []
        self._tasks: list[asyncio.Task[None]] = []

    # --- the container ------------------------------------------------------------------------

    def start(self) -> Pod:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.dir, start_new_session=True)
        self._tasks = [asyncio.create_task(self._probe_loop())]
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logged(self, event: str | None = None) -> list[dict[str, Any]]:
        import json

        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict) and (event is None or line.get("event") == event):
                    lines.append(line)
        return lines

    @property
    def node_id(self) -> str:
        return str(self.logged("node started")[0]["node_id"])

    def kill(self) -> None:
        """SIGKILL the container's processes by PID: its first one and what it started (tini
        puts the node in a process group of its own, so a group kill would miss it)."""
        for task in self._tasks:
            task.cancel()
        if self.proc is not None and self.proc.poll() is None:
            for pid in [*descendants(self.proc.pid), self.proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    # --- the kubelet's probes -----------------------------------------------------------------

    async def _probe_loop(self) -> None:
        async with aiohttp.ClientSession() as session:
            await self._startup(session)
            self.started.set()
            await asyncio.gather(self._readiness(session), self._liveness(session))

    async def _run(self, session: aiohttp.ClientSession, probe: Probe) -> int | None:
        started = time.monotonic()
        status = await probe.check(session)
        self.results.append((started, probe.kind, status))  # When the probe was sent.
        return status

    async def _startup(self, session: aiohttp.ClientSession) -> None:
        probe = self.probes["startupProbe"]
        await asyncio.sleep(probe.initial_delay)
        failures = 0
        while True:
            status = await self._run(session, probe)
            if status is not None and 200 <= status < 400:
                return
            failures += 1
            assert failures < probe.failure_threshold, (
                f"{self.name}: the startup probe failed {failures} times; the kubelet would "
                f"restart the container. Log:\n{self.log_path.read_text()[-3000:]}")
            await asyncio.sleep(probe.period)

    async def _readiness(self, session: aiohttp.ClientSession) -> None:
        probe = self.probes["readinessProbe"]
        await asyncio.sleep(probe.initial_delay)
        successes = failures = 0
        while self.alive:
            status = await self._run(session, probe)
            if status is not None and 200 <= status < 400:
                successes, failures = successes + 1, 0
                if successes >= probe.success_threshold:
                    self.ready = True
            else:
                successes, failures = 0, failures + 1
                if failures >= probe.failure_threshold:
                    self.ready = False
            await asyncio.sleep(probe.period)
        self.ready = False

    async def _liveness(self, session: aiohttp.ClientSession) -> None:
        probe = self.probes["livenessProbe"]
        await asyncio.sleep(probe.initial_delay)
        failures = 0
        while self.alive:
            status = await self._run(session, probe)
            failures = 0 if status is not None and 200 <= status < 400 else failures + 1
            assert failures < probe.failure_threshold or not self.alive, (
                f"{self.name}: liveness failed {failures} times; the kubelet would restart it")
            await asyncio.sleep(probe.period)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        await asyncio.wait_for(self.started.wait(), timeout)
        while not self.ready:
            assert self.alive, f"{self.name} exited: {self.log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name} did not get ready"
            await asyncio.sleep(0.05)

    # --- deletion -----------------------------------------------------------------------------

    async def delete(self) -> Termination:
        """The kubelet's part of a pod deletion: preStop, SIGTERM when it returns, SIGKILL at
        the grace period. Meanwhile /livez is watched closely (beyond the declared probes)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.terminating = True
        watch = asyncio.create_task(self._watch_livez())
        hook = await asyncio.create_subprocess_exec(
            *self.hook, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, cwd=self.dir)
        output, _ = await asyncio.wait_for(hook.communicate(), self.grace)
        hook_seconds = time.monotonic() - t0
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, max(0.0, t0 + self.grace - time.monotonic()))
        exit_seconds = time.monotonic() - t0
        if self.proc.poll() is None:
            self.kill()  # SIGKILL, as the kubelet would: the assertion below reports it.
        livez = await watch
        # The first readiness probe sent once the hook had returned: one sent while the hook
        # was still starting (before its POST /admin/drain) may rightly still see 200.
        after = [(t - t0, status) for t, kind, status in self.results
                 if kind == "readinessProbe" and t >= t0 + hook_seconds]
        return Termination(
            hook_exit=int(hook.returncode or 0), hook_seconds=hook_seconds,
            hook_output=output.decode(errors="replace"), exit_code=int(self.proc.returncode),
            exit_seconds=exit_seconds, first_readiness=after[0] if after else None, livez=livez)

    async def _watch_livez(self) -> list[int | None]:
        probe = self.probes["livenessProbe"]
        seen: list[int | None] = []
        async with aiohttp.ClientSession() as session:
            while self.alive:
                seen.append(await probe.check(session))
                await asyncio.sleep(0.2)
        return seen


class Endpoints:
    """The endpoint controller and nginx's resolver: the balancer's upstream follows the ready,
    not terminating pods, PROPAGATION seconds late."""

    def __init__(self, balancer: Balancer, pods: list[Pod]) -> None:
        self.balancer = balancer
        self.pods = pods
        self.current = sorted(balancer.upstream_ports)
        self.changes: list[list[int]] = []
        self._task = asyncio.create_task(self._loop())

    def wanted(self) -> list[int]:
        return sorted(p.client_port for p in self.pods
                      if p.ready and not p.terminating and p.alive)

    async def _loop(self) -> None:
        while True:
            if self.wanted() != self.current and self.wanted():
                await asyncio.sleep(PROPAGATION)
                wanted = self.wanted()
                if wanted and wanted != self.current:
                    await asyncio.to_thread(self.balancer.reload, wanted)
                    self.current = wanted
                    self.changes.append(wanted)
            await asyncio.sleep(0.05)

    async def settle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.wanted() != self.current:
            assert time.monotonic() < deadline, "the endpoints did not follow the pods"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self._task.cancel()


class Traffic:
    """Subscribers and a publisher through nginx, all with signed tokens (production: jwt)."""

    def __init__(self, url: str, secret: str) -> None:
        self.url = url
        self.secret = secret
        self.subscribers: list[Client] = []
        self.received: list[list[int]] = []
        self.acked: list[int] = []
        self.in_flight_lost = 0
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def token(self, user: str) -> str:
        return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, self.secret,
                          algorithm="HS256")

    def client(self, user: str) -> Client:
        return Client(self.url, token=self.token(user), backoff_base=0.2, backoff_cap=2.0)

    async def start(self) -> None:
        async def subscribe(i: int) -> None:
            client = self.client(f"s{i}")
            await client.connect()
            await client.join(ROOM)
            self.subscribers.append(client)
            got: list[int] = []
            self.received.append(got)
            self.tasks.append(asyncio.create_task(self._consume(client, got)))

        await asyncio.gather(*(subscribe(i) for i in range(SUBSCRIBERS)))
        self.publisher = self.client("publisher")
        await self.publisher.connect()
        self.tasks.append(asyncio.create_task(self._publish()))

    async def _consume(self, client: Client, got: list[int]) -> None:
        with contextlib.suppress(ClientError):
            async for event in client:
                if event["type"] == "message":
                    got.append(int(event["offset"]))

    async def _publish(self) -> None:
        next_at = time.monotonic()
        for n in range(MAX_MESSAGES):
            if self.stop.is_set():
                return
            try:
                self.acked.append(await self.publisher.publish(ROOM, {"n": n}))
            except ClientError:
                self.in_flight_lost += 1  # In flight at a 1012: maybe stored, never acked.
            next_at += 1 / RATE
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # Pacing only.

    async def flowing(self, messages: int = 5, timeout: float = 10.0) -> None:
        """Wait until ``messages`` more publications were acknowledged."""
        target = len(self.acked) + messages
        deadline = time.monotonic() + timeout
        while len(self.acked) < target:
            assert time.monotonic() < deadline, "the publisher is stuck"
            await asyncio.sleep(0.05)

    async def finish(self) -> int:
        """Stop publishing; wait until every subscriber has the last stored offset."""
        self.stop.set()
        await asyncio.wait_for(self.tasks[-1], 15)
        history = await self.publisher.history(ROOM, limit=1)
        final = int(history[-1]["offset"])
        # A shortfall is reported message by message by the test's assertions.
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: all(got and got[-1] >= final for got in self.received),
                           timeout=20, what="every subscriber to reach the last offset")
        return final

    async def close(self) -> None:
        for client in [*self.subscribers, self.publisher]:
            await client.close()
        for task in self.tasks:
            task.cancel()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture
async def cluster(tmp_path: Path, redis: RedisServer) -> AsyncIterator[dict[str, Any]]:
    """The rendered production manifests (secrets: the test's, Redis: the local one), the dev
    overlay's drain timings, and everything started here stopped by PID afterwards."""
    tree = prepare_tree(tmp_path, {**TEST_SECRETS, "redis-url": redis.url})
    production = render(tree / "overlays" / "production")
    dev = render(tree / "overlays" / "dev")
    dev_env = container_env(dev, node_container(find(dev, "Deployment", "roomcast")))
    timings = {k: dev_env[k] for k in ("ROOMCAST_DRAIN_DELAY", "ROOMCAST_DRAIN_WINDOW",
                                       "ROOMCAST_CLOSE_TIMEOUT")}
    dev_grace = float(find(dev, "Deployment", "roomcast")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"])
    _, cert, key = ensure_dev_certificate(tmp_path / "certs")
    state: dict[str, Any] = {"docs": production, "timings": timings, "grace": dev_grace,
                             "root": tmp_path / "pods", "pods": [], "cert": cert, "key": key}
    try:
        yield state
    finally:
        if state.get("endpoints") is not None:
            state["endpoints"].stop()
        for pod in state["pods"]:
            pod.kill()
        if state.get("balancer") is not None:
            state["balancer"].stop(timeout=5)


def check_termination(pod: Pod, ended: Termination, grace: float) -> None:
    """What the kubelet and the clients must see when ``pod`` is deleted."""
    readiness = pod.probes["readinessProbe"]
    assert ended.hook_exit == 0, ended.hook_output
    assert "prestop drain started" in ended.hook_output, ended.hook_output
    # Readiness: 503 at the first probe after the hook returned, so within one period of it.
    assert ended.first_readiness is not None, (pod.name, pod.results[-6:])
    sent, status = ended.first_readiness
    assert status == 503 and sent <= ended.hook_seconds + readiness.period, (
        ended.first_readiness, ended.hook_seconds)
    # Liveness: 200 all along, until the process stopped answering at its very end.
    answered = [s for s in ended.livez if s is not None]
    assert answered and set(answered) == {200}, ended.livez
    assert None not in ended.livez[:len(answered)], ended.livez
    assert ended.exit_code == 0, pod.log_path.read_text()[-3000:]
    assert ended.exit_seconds < grace, (ended.exit_seconds, grace)
    # The hook returned at once, with the drain running; the SIGTERM that followed reached the
    # node during the drain delay and did not cut the drain short: every close is a 1012.
    assert ended.hook_seconds < pod.settings.drain_delay, ended.hook_seconds
    (drain,) = pod.logged("drain started")
    assert drain["delay"] == pod.settings.drain_delay and drain["connections"] > 0, drain
    signals = pod.logged("signal received")
    assert [(s["signal"], s["count"]) for s in signals] == [("SIGTERM", 1)], signals
    stopping = pod.logged("node stopping")
    assert [line["code"] for line in stopping] == [1012], stopping
    closed = [line.get("code") for line in pod.logged("connection closed")]
    assert len(closed) == drain["connections"] and set(closed) == {1012}, closed


@pytest.mark.timeout(120)
async def test_the_kubelet_rehearsal_drains_and_rolls_without_loss(
        cluster: dict[str, Any]) -> None:
    """Two pods from the production Deployment behind nginx: deleting one runs preStop (drain
    started, readiness 503 within one probe period, liveness 200), SIGTERM when it returns,
    exit 0 within the grace period, its clients resume on the other pod; then a rolling update
    of every replica (surge 1, unavailable 0) the same way. Every acknowledged message reaches
    every subscriber exactly once, in order."""
    docs, timings, grace = cluster["docs"], cluster["timings"], cluster["grace"]
    pods: list[Pod] = cluster["pods"]
    serial = iter(range(1, 100))

    def new_pod() -> Pod:
        pod = Pod(f"pod-{next(serial)}", docs, cluster["root"], timings).start()
        pods.append(pod)
        return pod

    first = [new_pod(), new_pod()]
    await asyncio.gather(*(p.wait_ready() for p in first))
    # The rehearsal's drain is bounded like production's: same formula, the dev grace period.
    assert drain_bound(first[0].settings) <= grace
    balancer = Balancer(cluster["root"] / "nginx", [p.client_port for p in first],
                        cert=cluster["cert"], key=cluster["key"]).start()
    cluster["balancer"] = balancer
    endpoints = Endpoints(balancer, pods)
    cluster["endpoints"] = endpoints
    traffic = Traffic(balancer.ws_url, TEST_SECRETS["jwt-secrets"])
    await traffic.start()
    try:
        await traffic.flowing()
        by_node = {p.node_id: p for p in first}
        on = {p.node_id: sum(c.node_id == p.node_id for c in traffic.subscribers) for p in first}
        assert all(on.values()), f"least_conn left a pod without subscribers: {on}"

        # 1. Delete one pod; its ReplicaSet starts a replacement at the same time.
        victim = first[0]
        moved = [c for c in traffic.subscribers if c.node_id == victim.node_id]
        replacement = new_pod()
        deleted = await victim.delete()
        check_termination(victim, deleted, grace)
        # The last ones closed may still wait out their reconnect hint (up to 1 s).
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: all(c.connected and c.node_id != victim.node_id
                                       for c in moved), timeout=10, what="the moved clients")
        assert all(c.connected and c.node_id != victim.node_id and c.reconnects >= 1
                   for c in moved), [(c.node_id, c.reconnects) for c in moved]
        assert {c.node_id for c in moved} <= {first[1].node_id, replacement.node_id}
        await replacement.wait_ready()
        await endpoints.settle()
        await traffic.flowing()

        # 2. A rolling update of every replica: a new pod ready first, then an old one goes.
        rolled = []
        for old in (first[1], replacement):
            surge = new_pod()
            await surge.wait_ready()
            await endpoints.settle()
            ended = await old.delete()
            check_termination(old, ended, grace)
            rolled.append(ended)
            await endpoints.settle()
            await traffic.flowing()
        live = {p.node_id for p in pods if p.alive}
        assert len(live) == 2 and not live & ({*by_node, replacement.node_id})
        final = await traffic.finish()
    finally:
        await traffic.close()

    assert len(traffic.acked) >= 20, traffic.acked
    assert traffic.acked == sorted(traffic.acked)
    # Every subscriber joined before the first publication: each has every stored message
    # (acknowledged ones and those stored while in flight at a close) once, in order.
    assert set(traffic.acked) <= set(range(1, final + 1))
    for i, got in enumerate(traffic.received):
        missing = sorted(set(range(1, final + 1)) - set(got))
        assert got == list(range(1, final + 1)), (
            f"subscriber {i}: {len(got)} of {final}, missing {missing[:10]}, "
            f"{len(got) - len(set(got))} duplicates")
    assert all(c.reconnects >= 1 for c in traffic.subscribers)  # every pod was replaced
    assert all(c.failed_connects == 0 for c in traffic.subscribers)
    print(f"\nkubelet rehearsal: {len(pods)} pods, {len(traffic.acked)} messages acknowledged "
          f"({traffic.in_flight_lost} in flight at a close), {SUBSCRIBERS} subscribers, 0 lost; "
          f"drains (preStop s / exit s): "
          + ", ".join(f"{e.hook_seconds:.1f}/{e.exit_seconds:.1f}" for e in [deleted, *rolled]))
