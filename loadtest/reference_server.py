"""The bench's yardstick: the least a python-websockets broadcast server can do, under uvloop.

Every client is a subscriber; a text frame ``{"type": "publish", ...}`` is broadcast, as is, to
every connection (the sender included) with one ``broadcast()``. No rooms, no history, no
presence, no per-client state beyond what websockets keeps, compression off: roomcast's figures
divided by these show what roomcast's features cost over the library's floor.

With ``--redis-url`` several of these processes form the bare cluster beside which a roomcast
cluster is measured: a publish frame goes to one Redis channel (one PUBLISH, awaited), and each
process broadcasts what that channel carries to its own connections (redis-py's pub/sub).

    python -m loadtest.reference_server --port 8765
    python -m loadtest.reference_server --port 8766 --redis-url redis://127.0.0.1:6379/0

prints ``listening on ws://127.0.0.1:PORT`` once it accepts connections (``--port 0`` picks one).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
from collections.abc import Sequence

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

CONNECTIONS: set[ServerConnection] = set()
#: The Redis channel the processes of a bare cluster share.
CHANNEL = "reference"


async def handler(ws: ServerConnection, redis: aioredis.Redis | None = None) -> None:
    CONNECTIONS.add(ws)
    try:
        async for frame in ws:
            if isinstance(frame, str) and _is_publish(frame):
                if redis is None:
                    broadcast(CONNECTIONS, frame)
                else:
                    await redis.publish(CHANNEL, frame)
    except ConnectionClosed:
        pass
    finally:
        CONNECTIONS.discard(ws)


async def relay(redis: aioredis.Redis, subscribed: asyncio.Event) -> None:
    """Broadcast every message of CHANNEL to this process's connections."""
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(CHANNEL)
        subscribed.set()
        async for message in pubsub.listen():
            if message["type"] == "message":
                broadcast(CONNECTIONS, message["data"].decode())


def _is_publish(frame: str) -> bool:
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return False
    return isinstance(message, dict) and message.get("type") == "publish"


async def serve_forever(host: str, port: int, redis_url: str | None = None,
                        backlog: int = 100) -> None:
    """Serve until SIGTERM or SIGINT; over Redis with ``redis_url``, once subscribed."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    redis = aioredis.from_url(redis_url) if redis_url else None
    relaying: asyncio.Task[None] | None = None
    if redis is not None:
        subscribed = asyncio.Event()
        relaying = asyncio.create_task(relay(redis, subscribed))
        await subscribed.wait()
    async with serve(functools.partial(handler, redis=redis), host, port,
                     compression=None, backlog=backlog) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"listening on ws://{host}:{bound}", flush=True)
        await stop.wait()
    if relaying is not None:
        relaying.cancel()


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
    parser.add_argument("--backlog", type=int, default=100,
                        help="listen backlog (default: 100, asyncio's)")
    parser.add_argument("--redis-url", default=None,
                        help="publish through this Redis, and broadcast what it carries: one "
                        "process of a bare cluster (default: alone, no Redis)")
    args = parser.parse_args(argv)
    import uvloop

    try:
        uvloop.run(serve_forever(args.host, args.port, args.redis_url, args.backlog))
    except OSError as exc:
        print(f"reference_server: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
