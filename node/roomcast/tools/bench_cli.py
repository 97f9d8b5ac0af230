"""``roomcast bench``: the load benchmark of loadtest/bench.py, as a roomcast subcommand.

``loadtest/`` is tooling of the repository, not part of the wheel: ``roomcast bench`` finds it in
the current directory (run it from a roomcast checkout) or wherever it is importable.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType


def _import_bench() -> ModuleType:
    try:
        return importlib.import_module("loadtest.bench")
    except ImportError:
        checkout = Path.cwd()
        if not (checkout / "loadtest" / "bench.py").is_file():
            raise
        sys.path.insert(0, str(checkout))
        return importlib.import_module("loadtest.bench")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench`` to the ``roomcast`` subparsers (the same flags as python -m loadtest.bench)."""
    try:
        bench = _import_bench()
    except ImportError as exc:  # Not in a checkout, or without the [load] extra: say so.
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
    print(f"roomcast bench: run it from a roomcast checkout with the [load] extra installed "
          f"({reason})", file=sys.stderr)
    return 1
