"""The chaos suite's marker, its on/off switch, the report summary and the 2-node cluster.

Cases marked ``chaos`` are the long ones: they are skipped unless ``ROOMCAST_CHAOS=1`` is set
(``ROOMCAST_CHAOS=1 pytest -s tests/chaos``) or the marker is selected explicitly
(``pytest -m chaos tests/chaos``). The quick cases always run, so ``./dev test`` has them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import redis

from tests.chaos.canary import Report
from tests.harness import NodeProcess, RedisServer

#: Every report line of the session, printed again in the terminal summary.
REPORTS: list[str] = []


def chaos_enabled(config: pytest.Config) -> bool:
    return os.environ.get("ROOMCAST_CHAOS") == "1" or "chaos" in str(config.option.markexpr)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: long chaos case; runs with ROOMCAST_CHAOS=1 or -m chaos "
        "(see tests/chaos/README.md)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if chaos_enabled(config):
        return
    skip = pytest.mark.skip(reason="long chaos case: set ROOMCAST_CHAOS=1 (tests/chaos/README.md)")
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("chaos report")
        for line in REPORTS:
            terminalreporter.write_line(line)


@pytest.fixture
def record() -> Callable[[Report], str]:
    """Print a case's report line (``-s`` shows it; the captured output is shown on failure)
    and keep it for the terminal summary; returns the line."""

    def keep(report: Report) -> str:
        line = report.line()
        print(report.details(), flush=True)
        REPORTS.append(line)
        return line

    return keep


#: Flags of every chaos node: the canary publisher is one connection at up to 200 msg/s.
FAST = ("--rate-limit", "1000", "--rate-burst", "2000")
COMMON = ("--presence-grace", "2", "--unsubscribe-linger", "1")


@dataclass
class Cluster:
    """Two nodes (a, b) on one redis-server, and a Redis client for the faults."""

    redis: RedisServer
    a: NodeProcess
    b: NodeProcess
    r: redis.Redis

    @property
    def nodes(self) -> list[NodeProcess]:
        return [self.a, self.b]

    def subscriber_urls(self) -> dict[str, list[str]]:
        """Each node's subscribers: their own node first, then the other one."""
        return {"a": [self.a.ws(), self.b.ws()], "b": [self.b.ws(), self.a.ws()]}

    def log_summary(self, limit: int = 25) -> str:
        """What the nodes logged at warning and above, plus the lifecycle events that explain
        a chaos outcome (lost Redis, refills, gaps, slow consumers)."""
        notable = {"redis connection lost", "redis pubsub connected", "gap refilled from history",
                   "messages lost in a gap, members told", "closing slow consumer",
                   "closing flooding client", "redis unreachable"}
        rows = []
        for node in self.nodes:
            hits = [line for line in node.lines
                    if line.get("level") in ("warning", "error", "critical")
                    or line.get("event") in notable]
            counts: dict[str, int] = {}
            for line in hits:
                counts[str(line.get("event"))] = counts.get(str(line.get("event")), 0) + 1
            rows.append(f"node {node.node_id}: {counts}")
            for line in hits[-limit:]:
                fields = {k: v for k, v in line.items() if k not in ("timestamp", "node_id")}
                rows.append(f"    {fields}")
        return "\n".join(rows)


@pytest.fixture
def cluster(
    redis_server: RedisServer, start_node: Callable[..., NodeProcess],
) -> Iterator[Callable[..., Cluster]]:
    """Factory: ``cluster(*flags, pubsub_limit=None)`` -> a started 2-node Cluster.

    ``pubsub_limit`` (e.g. ``"1mb 512kb 1"``) sets Redis's pub/sub client output-buffer limit
    before the nodes connect. ``flags`` replace the fast rate limit when given.
    """
    clients: list[redis.Redis] = []

    def start(*flags: str, pubsub_limit: str | None = None, fast: bool = True) -> Cluster:
        r = redis.Redis.from_url(redis_server.url, socket_timeout=5)
        clients.append(r)
        if pubsub_limit is not None:
            r.config_set("client-output-buffer-limit", f"pubsub {pubsub_limit}")
        extra: Sequence[str] = (*(FAST if fast else ()), *COMMON, *flags)
        a = start_node(redis_server.url, *extra, node_id="chaos-a")
        b = start_node(redis_server.url, *extra, node_id="chaos-b")
        return Cluster(redis_server, a, b, r)

    yield start
    for r in clients:
        r.close()
