"""The bench's yardstick: the least a python-websockets broadcast server can do, under uvloop.

Every client is a subscriber; a text frame ``{"type": "publish", ...}`` is broadcast, as is, to
every connection (the sender included) with one ``broadcast()``. No rooms, no history, no
presence, no per-client state beyond what websockets keeps, compression off: roomcast's figures
divided by these show what roomcast's features cost over the library's floor.

    python -m loadtest.reference_server --port 8765

prints ``listening on ws://127.0.0.1:PORT`` once it accepts connections (``--port 0`` picks one).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

CONNECTIONS: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    CONNECTIONS.add(ws)
    try:
        async for frame in ws:
            if isinstance(frame, str) and _is_publish(frame):
                broadcast(CONNECTIONS, frame)
    except ConnectionClosed:
        pass
    finally:
        CONNECTIONS.discard(ws)


def _is_publish(frame: str) -> bool:
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return False
    return isinstance(message, dict) and message.get("type") == "publish"


async def serve_forever(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, host, port, compression=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"listening on ws://{host}:{bound}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.reference_server",
        description="A bare python-websockets broadcast server (uvloop, no compression): the "
        "reference the bench compares roomcast with.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on "
                        "(default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765,
                        help="TCP port; 0 picks a free one (default: 8765)")
    args = parser.parse_args(argv)
    import uvloop

    try:
        uvloop.run(serve_forever(args.host, args.port))
    except OSError as exc:
        print(f"reference_server: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
