"""The ``roomcast`` command: ``roomcast node`` runs a node; the other subcommands are its tools.

``roomcast node`` imports only the node: the tools (``roomcast.tools``: client, cluster, nginx,
bench) are imported when their own subcommand runs, so that a serving process never loads them
(tests/unit/test_layers.py checks it with ``python -X importtime``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import sys
from collections.abc import Sequence

from roomcast import config as config_module

# A node holds many long-lived objects per connection (protocol, transport, tasks). CPython's
# collections walk them all: with 2,500 connections a node stalled for 100+ ms now and then, which
# was the whole fan-out p99 tail (5,000 subscribers x 10 msg/s on 2 nodes: p99 129-137 ms before,
# 46 ms after; docs/BENCHMARKS.md). Objects made before serving are frozen out of collection, and
# generation 0 collects every 50,000 allocations instead of 700.
GC_THRESHOLDS = (50_000, 20, 1000)

#: Tool subcommands: the module whose ``register(sub)`` adds them, and their one-line help.
TOOLS: dict[str, tuple[str, str]] = {
    "chat": ("roomcast.tools.client_cli", "chat in a room from the terminal"),
    "publish": ("roomcast.tools.client_cli", "publish messages to a room and print their offsets"),
    "subscribe": ("roomcast.tools.client_cli", "print a room's messages as JSON lines"),
    "bench": ("roomcast.tools.bench_cli",
              "benchmark fan-out throughput, latency and memory against a reference"),
    "cluster": ("roomcast.tools.cluster", "run a local cluster: redis-server, nodes and nginx"),
    "drain": ("roomcast.tools.cluster", "ask one node to drain (POST /admin/drain)"),
    "token": ("roomcast.tools.token_cli",
              "mint a signed connection or room token (JWT) for testing"),
    "api": ("roomcast.tools.api_cli",
            "call the server API of a node: publish, presence, disconnect, ..."),
}


def raise_fd_limit() -> None:
    """Every WebSocket is a file descriptor: lift the soft limit to the hard one (a node with the
    usual soft 1024 would refuse connections long before it runs out of anything else)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tune_gc() -> None:
    """Process-wide GC settings for a serving node (called once, after start-up)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_node(args: argparse.Namespace) -> int:
    try:
        cfg = config_module.load_config(args)
    except ValueError as exc:
        print(f"roomcast node: {exc}", file=sys.stderr)
        return 2
    from roomcast import logs
    from roomcast.app import Node

    logs.configure(cfg.log_format, cfg.log_level)
    raise_fd_limit()

    problem: list[str] = []

    async def serve_node() -> None:
        try:
            node = Node(cfg)
            await node.start()
        except ValueError as exc:
            # A namespaces file or key file that cannot be used: one line, as for a bad flag.
            problem.append(str(exc))
            return
        except OSError as exc:  # A port in use, an address that is not ours.
            problem.append(f"cannot listen: {exc.strerror or exc}")
            return
        tune_gc()
        await node.run()

    import uvloop

    uvloop.run(serve_node())
    if problem:
        print(f"roomcast node: {problem[0]}", file=sys.stderr)
        return 2
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, the tools other than that command are help-only stubs
    (their modules are not imported)."""
    parser = argparse.ArgumentParser(
        prog="roomcast",
        description="roomcast: a horizontally scaled WebSocket broadcast cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    node = sub.add_parser(
        "node", help="run one node (alone, or in a cluster with --redis-url)",
        description="Run one roomcast node. Every flag is also an environment variable.",
    )
    config_module.add_arguments(node)
    node.set_defaults(func=run_node)
    modules = dict.fromkeys(module for module, _ in TOOLS.values())
    if only is not None:
        modules = dict.fromkeys([TOOLS[only][0]] if only in TOOLS else [])
    for module in modules:
        importlib.import_module(module).register(sub)
    for name, (_, help_text) in TOOLS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(only=command).parse_args(argv)
    sys.exit(args.func(args))
