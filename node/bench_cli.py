"""``roomcast bench``: the load benchmark of loadtest/bench.py, as a roomcast subcommand."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench`` to the ``roomcast`` subparsers (the same flags as python -m loadtest.bench)."""
    try:
        from loadtest import bench
    except ImportError as exc:  # An install without the loadtest package: say so when asked.
        missing = str(exc)
        stub = sub.add_parser("bench", help="benchmark fan-out (needs the loadtest package)")
        stub.set_defaults(func=lambda _args: _unavailable(missing))
        return
    parser = sub.add_parser(
        "bench", help="benchmark fan-out throughput, latency and memory against a reference",
        description=bench.DESCRIPTION, epilog=bench.EPILOG.replace(
            "python -m loadtest.bench", "roomcast bench"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(parser)
    parser.set_defaults(func=bench.run)


def _unavailable(reason: str) -> int:
    print(f"roomcast bench: the loadtest package is not installed ({reason})", file=sys.stderr)
    return 1
