"""The ``roomcast`` command: ``roomcast node`` runs a node; other subcommands are its tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from node import bench_cli, client_cli
from node import cluster as cluster_cli
from node import config as config_module


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
