"""``roomcast chat``, ``roomcast publish`` and ``roomcast subscribe``: tools on the client.

Each command is a thin shell around ``roomcast.tools.client.Client``: it reconnects and resumes
the same way. Data goes to stdout (chat lines, or one JSON document per line); status and errors
go to stderr as one line each. Exit codes: 0 success, 1 a failure reported on stderr, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final

import orjson

from roomcast.protocol.envelopes import Since
from roomcast.tools.argtypes import non_negative_int, positive_int
from roomcast.tools.client import (
    Client,
    ClientClosed,
    ClientError,
    Envelope,
    RateLimited,
    native_url,
)

#: How often `roomcast publish` resends a message refused with rate_limited before giving up.
PUBLISH_RATE_LIMIT_RETRIES: Final = 10


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client subcommands to the ``roomcast`` subparsers."""
    chat = sub.add_parser(
        "chat", help="chat in a room from the terminal",
        description="Interactive chat in one room: type a line to send it, /quit to leave. "
        "Incoming messages print as 'name: text', arrivals and departures as '* bob joined'. "
        "Works with a pipe as stdin too; end of input leaves like /quit.",
    )
    _add_url(chat)
    chat.add_argument("--room", default="general", help="room to join (default: general)")
    chat.add_argument("--name", required=True,
                      help="your display name (the username others see)")
    chat.add_argument("--user-id", help="your user id (default: the --name)")
    _add_token(chat)
    _add_verbose(chat)
    chat.set_defaults(func=lambda args: _run(chat_main(args)))

    publish = sub.add_parser(
        "publish", help="publish messages to a room and print their offsets",
        description="Publish one message, or one per line of stdin when the value is '-'. "
        "Prints {\"room\", \"offset\", \"epoch\"} as one JSON line per message. "
        "Exit 0 when every message was accepted, 1 with a one-line error otherwise.",
    )
    _add_url(publish)
    publish.add_argument("--room", required=True, help="room to publish to (joining not needed)")
    data = publish.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="JSON",
                      help="the message data as a JSON value; '-': one JSON value per stdin line")
    data.add_argument("--text", metavar="TEXT",
                      help="the message data as a string; '-': one string per stdin line")
    _add_identity(publish)
    _add_verbose(publish)
    publish.set_defaults(func=lambda args: _run(publish_main(args)))

    subscribe = sub.add_parser(
        "subscribe", help="print a room's messages as JSON lines",
        description="Join a room and print each message envelope as one JSON line, flushed at "
        "once. Status goes to stderr. Stops after --count messages, or cleanly on SIGINT or "
        "SIGTERM.",
    )
    _add_url(subscribe)
    subscribe.add_argument("--room", required=True, help="room to subscribe to")
    subscribe.add_argument("--count", type=positive_int, metavar="N",
                           help="exit after printing N messages (default: run until stopped)")
    subscribe.add_argument("--since-offset", type=non_negative_int, metavar="N",
                           help="first replay the stored messages after offset N "
                           "(needs --since-epoch)")
    subscribe.add_argument("--since-epoch", metavar="EPOCH",
                           help="the epoch that --since-offset belongs to")
    _add_identity(subscribe)
    _add_verbose(subscribe)
    subscribe.set_defaults(func=lambda args: _run(subscribe_main(args)))


# --- argument helpers --------------------------------------------------------------------------


def _ws_url(text: str) -> str:
    try:
        native_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url", metavar="URL", type=_ws_url,
        help="the node's WebSocket address, ws://host:port or ws://host:port/ws "
        "(wss:// for TLS; http(s):// is accepted too)",
    )


def _add_identity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user-id", help="user id to connect as, with --auth none (default: one "
                        "the node assigns)")
    parser.add_argument("--name", help="username others see, with --auth none (default: the "
                        "user id)")
    _add_token(parser)


def _add_token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=os.environ.get("ROOMCAST_TOKEN"),
                        help="connection token for a node with --auth jwt (see `roomcast "
                        "token`); default: $ROOMCAST_TOKEN")


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log connection events (reconnects, ...) to stderr")


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        return 130


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _error(command: str, problem: object) -> int:
    """Report a failure as one line on stderr; the exit code is 1."""
    text = " ".join(str(problem).split()) or type(problem).__name__
    print(f"roomcast {command}: {text}", file=sys.stderr, flush=True)
    return 1


def _write_line(line: str | bytes) -> bool:
    """Write one line to stdout and flush it; False when the reader went away (closed pipe)."""
    try:
        if isinstance(line, bytes):
            sys.stdout.buffer.write(line + b"\n")
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so that the interpreter's final flush does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
    return True


def _on_stop_signals(stop: asyncio.Event) -> Callable[[], None]:
    """Set ``stop`` on SIGINT or SIGTERM; return the function that restores the defaults."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def restore() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    return restore


async def stdin_lines(fd: int = 0) -> AsyncIterator[str]:
    """Lines of ``fd`` (without the newline) until end of input, a closed or missing stdin.

    A daemon thread does the blocking reads, so this works for ttys, pipes and regular files
    alike (the event loop's pipe transports refuse files). It reads with os.read, not through
    sys.stdin, so that a thread still blocked at exit holds no lock the interpreter wants.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=64)

    def put(item: str | None) -> None:  # In the thread: blocks while the queue is full.
        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    def pump() -> None:
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    put(line.decode(errors="replace").rstrip("\r"))
            if pending:
                put(pending.decode(errors="replace").rstrip("\r"))
            put(None)
        except Exception:  # The loop is closed: the program is exiting, nobody is listening.
            return

    threading.Thread(target=pump, name="stdin-reader", daemon=True).start()
    while (line := await queue.get()) is not None:
        yield line


# --- chat --------------------------------------------------------------------------------------


def _printable(text: str) -> str:
    """``text`` on one line, without control characters (no terminal escapes from a peer)."""
    return "".join(ch if ch.isprintable() else " " if ch in "\n\t" else "?" for ch in text)


def format_event(event: Envelope) -> str | None:
    """The chat line for an event, or None for events the chat does not show (typing, ...)."""
    kind = event.get("type")
    if kind == "message":
        sender = event.get("from")
        name = sender.get("username") if isinstance(sender, dict) else None
        data = event.get("data")
        if isinstance(data, dict) and isinstance(data.get("text"), str):
            data = data["text"]
        text = data if isinstance(data, str) else orjson.dumps(data).decode()
        return f"{_printable(str(name or '?'))}: {_printable(text)}"
    if kind in ("user_joined", "user_left"):
        verb = "joined" if kind == "user_joined" else "left"
        return f"* {_printable(str(event.get('username', '?')))} {verb}"
    if kind == "recovery_failed":
        return "* reconnected, but some messages from while you were away are lost"
    if kind == "rejoin_failed":
        return f"* could not rejoin {event.get('room')}: {_printable(str(event.get('message')))}"
    return None


async def chat_main(args: argparse.Namespace) -> int:
    """Join, then print events and send typed lines at the same time until /quit or EOF."""
    _setup(args)
    room: str = args.room
    client = Client(args.url, user_id=args.user_id or args.name, username=args.name,
                    token=args.token)
    try:
        await client.connect()
    except ClientError as exc:
        return _error("chat", exc)
    stop = asyncio.Event()
    restore = _on_stop_signals(stop)
    tasks: list[asyncio.Task[Any]] = []
    try:
        await client.join(room)
        here = sorted({str(m.get("username")) for m in await client.presence(room)})
        _write_line(f"* joined {room} as {args.name}; here: {', '.join(here)}")
        tasks = [
            asyncio.create_task(_show(client)),
            asyncio.create_task(_send_typed(client, room)),
            asyncio.create_task(stop.wait()),
        ]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if tasks[0] in done:  # The connection ended for good.
            tasks[0].result()
            return 0
        if tasks[1] in done:  # /quit or end of input (a signal skips this).
            tasks[1].result()
        await client.leave(room)
        return 0
    except ClientError as exc:
        return _error("chat", exc)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        restore()


async def _show(client: Client) -> None:
    async for event in client:
        line = format_event(event)
        if line is not None and not _write_line(line):
            return


async def _send_typed(client: Client, room: str) -> None:
    async for line in stdin_lines():
        text = line.strip()
        if text == "/quit":
            return
        if not text:
            continue
        try:
            await client.publish(room, line)
        except ClientClosed:
            raise
        except RateLimited:
            _write_line("* not sent: you are typing too fast")
        except ClientError as exc:
            _write_line(f"* not sent: {exc}")


# --- publish -----------------------------------------------------------------------------------


async def publish_main(args: argparse.Namespace) -> int:
    """Publish each value and print its position; stop at the first failure."""
    _setup(args)
    is_json = args.data is not None
    value: str = args.data if is_json else args.text

    async def values() -> AsyncIterator[str]:
        if value != "-":
            yield value
            return
        async for line in stdin_lines():
            if line.strip():
                yield line

    try:
        client = Client(args.url, user_id=args.user_id, username=args.name, token=args.token)
        await client.connect()
    except ClientError as exc:
        return _error("publish", exc)
    try:
        async for raw in values():
            try:
                data = orjson.loads(raw) if is_json else raw
            except orjson.JSONDecodeError as exc:
                return _error("publish", f"not valid JSON ({exc}): {raw[:80]!r}")
            ack = await _publish_patiently(client, args.room, data)
            position = {"room": ack.get("room"), "offset": ack.get("offset"),
                        "epoch": ack.get("epoch")}
            if not _write_line(orjson.dumps(position)):
                return 1
        return 0
    except ClientError as exc:
        return _error("publish", exc)
    finally:
        await client.close()


async def _publish_patiently(client: Client, room: str, data: Any) -> Envelope:
    """Publish, waiting out rate limiting as the node asks (a piped file can be long)."""
    for _ in range(PUBLISH_RATE_LIMIT_RETRIES):
        try:
            return await client.publish_ack(room, data)
        except RateLimited as exc:
            await asyncio.sleep(exc.retry_after_ms / 1000.0)
    return await client.publish_ack(room, data)


# --- subscribe ---------------------------------------------------------------------------------


async def subscribe_main(args: argparse.Namespace) -> int:
    """Print the room's messages as JSON lines until --count, a signal, or a terminal close."""
    _setup(args)
    if (args.since_offset is None) != (args.since_epoch is None):
        print("roomcast subscribe: --since-offset and --since-epoch go together",
              file=sys.stderr)
        return 2
    since = None if args.since_epoch is None else Since(args.since_offset, args.since_epoch)
    room: str = args.room
    client = Client(args.url, user_id=args.user_id, username=args.name, token=args.token)
    try:
        await client.connect()
    except ClientError as exc:
        return _error("subscribe", exc)
    stop = asyncio.Event()
    restore = _on_stop_signals(stop)
    tasks: list[asyncio.Task[Any]] = []
    try:
        joined = await client.join(room, since=since)
        recovered = "" if since is None else f", recovered {str(joined.get('recovered')).lower()}"
        print(f"roomcast subscribe: joined {room} at offset {joined.get('offset')}, epoch "
              f"{joined.get('epoch')}{recovered}", file=sys.stderr, flush=True)
        tasks = [asyncio.create_task(_print_messages(client, room, args.count)),
                 asyncio.create_task(stop.wait())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if tasks[0].done():
            tasks[0].result()
        return 0
    except ClientError as exc:
        return _error("subscribe", exc)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        restore()


async def _print_messages(client: Client, room: str, count: int | None) -> None:
    printed = 0
    async for event in client:
        kind = event.get("type")
        if kind == "message" and event.get("room") == room:
            if not _write_line(orjson.dumps(event)):
                return
            printed += 1
            if count is not None and printed >= count:
                return
        elif kind in ("recovery_failed", "rejoin_failed"):
            print(f"roomcast subscribe: {kind}: {orjson.dumps(event).decode()}",
                  file=sys.stderr, flush=True)
