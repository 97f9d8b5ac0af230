"""Fault injection from the test side: run a node with one product function wrapped.

    python -m tests.faults FAULT [FAULT ...] -- [roomcast node flags]

The product carries no test-only code: a fault is installed here, in the node's process, before
``roomcast.cli.main`` starts the node, by wrapping the product function it is about. The harness
starts a node this way with ``NodeProcess(..., faults=[...])`` (the working directory is the
repository root, so ``tests`` is importable).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from roomcast import cli
from roomcast.service.connection import Connection
from roomcast.service.service import Service

#: The data of a publish that makes ``crash_on_data`` raise inside the handler.
CRASH_DATA = "__crash__"


def crash_on_data() -> None:
    """A publish whose data is ``"__crash__"`` raises RuntimeError inside the connection's handler
    (an unexpected bug, not a ProtocolError); every other publish is served as usual."""
    original = Service.publish

    async def publish(self: Service, conn: Connection, room: str, data: Any) -> Any:
        if data == CRASH_DATA:
            raise RuntimeError("injected fault crash_on_data")
        return await original(self, conn, room, data)

    Service.publish = publish  # type: ignore[method-assign]


#: The key of a publish's data that makes ``busy_on_data`` hold the event loop.
BUSY_KEY = "__busy__"


def busy_on_data() -> None:
    """A publish whose data is ``{"__busy__": seconds}`` keeps the event loop busy for that long
    (pure-Python work on the loop's thread, as a CPU-bound fan-out would), then is published as
    usual; nothing else of the node runs meanwhile."""
    original = Service.publish

    async def publish(self: Service, conn: Connection, room: str, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get(BUSY_KEY), int | float):
            until = time.monotonic() + float(data[BUSY_KEY])
            while time.monotonic() < until:  # Holds the GIL but for the interpreter's switches.
                pass
        return await original(self, conn, room, data)

    Service.publish = publish  # type: ignore[method-assign]


FAULTS: dict[str, Callable[[], None]] = {"crash_on_data": crash_on_data,
                                         "busy_on_data": busy_on_data}


def main(argv: Sequence[str]) -> None:
    """Install the faults named before ``--``, then run ``roomcast node`` with the rest."""
    args = list(argv)
    split = args.index("--") if "--" in args else len(args)
    names, node_args = args[:split], args[split + 1:]
    unknown = [name for name in names if name not in FAULTS]
    if not names or unknown:
        sys.exit(f"tests.faults: unknown or missing fault {unknown or names}; "
                 f"known: {', '.join(FAULTS)}")
    for name in names:
        FAULTS[name]()
    cli.main(["node", *node_args])


if __name__ == "__main__":
    main(sys.argv[1:])
