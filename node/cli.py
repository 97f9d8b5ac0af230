"""The ``roomcast`` command: ``roomcast node`` runs a node; other subcommands are its tools."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from node import bench_cli, client_cli
from node import cluster as cluster_cli
from node import config as config_module

# A node holds many long-lived objects per connection (protocol, transport, tasks). CPython's
# collections walk them all: with 2,500 connections a node stalled for 100+ ms now and then, which
# was the whole fan-out p99 tail (5,000 subscribers x 10 msg/s on 2 nodes: p99 129-137 ms before,
# 46 ms after; docs/BENCHMARKS.md). Objects made before serving are frozen out of collection, and
# generation 0 collects every 50,000 allocations instead of 700.
GC_THRESHOLDS = (50_000, 20, 1000)


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
    from node import logs
    from node.server import Node

    logs.configure(cfg.log_format, cfg.log_level)

    async def serve_node() -> None:
        node = Node(cfg)
        await node.start()
        tune_gc()
        await node.run()

    import uvloop

    uvloop.run(serve_node())
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    client_cli.register(sub)
    bench_cli.register(sub)
    cluster_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
