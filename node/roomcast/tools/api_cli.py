"""``roomcast api``: call a node's server API from a shell (docs/API.md).

``roomcast api [--url URL] [--key KEY] METHOD [flags]``, one subcommand per API method, each a
thin shell around ``roomcast.tools.api.ApiClient``. The reply's JSON goes to stdout as one line;
an error goes to stderr as ``roomcast api: <status> <code>: <message>`` (no status when no answer
came). Exit codes: 0 success, 1 the API refused or did not answer, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

import orjson

from roomcast.tools.api import DEFAULT_TIMEOUT, DEFAULT_URL, ApiClient, ApiError
from roomcast.tools.argtypes import non_negative_int, positive_float, positive_int

Call = Callable[[ApiClient, argparse.Namespace], dict[str, Any]]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``roomcast api`` and its method subcommands to the ``roomcast`` subparsers."""
    api = sub.add_parser(
        "api", help="call the server API of a node: publish, presence, disconnect, ...",
        description="Call one method of a node's server API (its internal port, --api-port) "
        "and print the JSON reply as one line on stdout. An error prints 'roomcast api: "
        "<status> <code>: <message>' on stderr and exits 1; bad usage exits 2.",
    )
    api.add_argument("--url", type=_http_url, default=os.environ.get("ROOMCAST_API_URL",
                                                                     DEFAULT_URL),
                     help="the node's internal port, http://host:port (default: "
                     f"$ROOMCAST_API_URL or {DEFAULT_URL})")
    api.add_argument("--key", default=os.environ.get("ROOMCAST_API_KEY"),
                     help="an API key of the node (--api-key); default: $ROOMCAST_API_KEY, "
                     "which, unlike this flag, other users cannot see in the process list")
    api.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                     help=f"seconds to wait for the reply (default: {DEFAULT_TIMEOUT:g})")
    methods = api.add_subparsers(dest="method", metavar="METHOD", required=True,
                                 help="the API method to call (METHOD --help: its flags)")

    publish = methods.add_parser(
        "publish", help="publish a message to a room as the server",
        description="Publish one message; prints {\"offset\", \"epoch\"} (and \"duplicate\": "
        "true when the idempotency key was already used in the room within its window).")
    _room(publish)
    _data(publish)
    publish.add_argument("--idempotency-key", metavar="K",
                         help="a retry with the same key publishes nothing and prints the "
                         "first result (1-128 printable characters)")
    publish.add_argument("--retries", type=non_negative_int, default=0, metavar="N",
                         help="retry up to N times on 503, 429 or no answer, under one "
                         "idempotency key (made up if none is given); default 0")
    _set(publish, lambda api, a: api.publish(a.room, a.data, a.idempotency_key,
                                             retries=a.retries))

    broadcast = methods.add_parser(
        "broadcast", help="publish one message to several rooms",
        description="Publish the same message to every --room; prints one result or error "
        "per room.")
    broadcast.add_argument("--room", dest="rooms", action="append", required=True,
                           metavar="ROOM", help="a room (repeat for each room)")
    _data(broadcast)
    _set(broadcast, lambda api, a: api.broadcast(a.rooms, a.data))

    presence = methods.add_parser("presence", help="list every connection in a room",
                                  description="Print the room's members, cluster-wide.")
    _room(presence)
    _set(presence, lambda api, a: api.presence(a.room))

    stats = methods.add_parser("presence-stats", help="count a room's connections and users",
                               description="Print {\"clients\", \"users\"} of the room.")
    _room(stats)
    _set(stats, lambda api, a: api.presence_stats(a.room))

    history = methods.add_parser(
        "history", help="print a room's stored messages",
        description="Print the room's stored messages (oldest first) with its offset and "
        "epoch.")
    _room(history)
    history.add_argument("--limit", type=positive_int, metavar="N",
                         help="at most N messages (1-1000): the newest, or the oldest after "
                         "--since-offset")
    history.add_argument("--reverse", action="store_true", help="newest first")
    history.add_argument("--since-offset", type=non_negative_int, metavar="N",
                         help="only the messages after offset N (needs --since-epoch)")
    history.add_argument("--since-epoch", metavar="EPOCH",
                         help="the epoch that --since-offset belongs to")
    _set(history, _history)

    disconnect = methods.add_parser(
        "disconnect", help="close every connection of a user, on every node",
        description="Close every connection of the user on every node of the cluster.")
    disconnect.add_argument("--user", required=True, metavar="U", help="the user id")
    disconnect.add_argument("--code", type=int, default=4500, metavar="C",
                            help="close code: 1000, 1008, 4000-4499 (the client reconnects) or "
                            "4500-4999 (it does not); default 4500")
    disconnect.add_argument("--reason", default="disconnected", metavar="TEXT",
                            help="close reason, at most 123 bytes (default: disconnected)")
    _set(disconnect, lambda api, a: api.disconnect(a.user, a.code, a.reason))

    unsubscribe = methods.add_parser(
        "unsubscribe", help="take a user out of a room, on every node",
        description="Take every connection of the user out of the room on every node.")
    unsubscribe.add_argument("--user", required=True, metavar="U", help="the user id")
    _room(unsubscribe)
    _set(unsubscribe, lambda api, a: api.unsubscribe(a.user, a.room))

    rooms = methods.add_parser(
        "rooms", help="list the rooms someone is in",
        description="Print {\"rooms\": {room: distinct users}} of the active rooms, "
        "cluster-wide.")
    rooms.add_argument("--pattern", metavar="P", help="only the rooms matching this glob "
                       "(chat:*)")
    _set(rooms, lambda api, a: api.rooms(a.pattern))

    info = methods.add_parser("info", help="the cluster's nodes and their connections",
                              description="Print the nodes of the cluster with their "
                              "connection counts, and the number of active rooms.")
    _set(info, lambda api, a: api.info())

    batch = methods.add_parser(
        "batch", help="run several commands in one request",
        description="Run a JSON list of {\"method\", \"params\"} commands in order; prints one "
        "result or error per command.")
    batch.add_argument("--commands", type=_json, required=True, metavar="JSON",
                       help="the list of commands as JSON; '-': read it from stdin")
    _set(batch, lambda api, a: api.batch(a.commands))


def _history(api: ApiClient, args: argparse.Namespace) -> dict[str, Any]:
    since = None
    if args.since_offset is not None:
        since = {"offset": args.since_offset, "epoch": args.since_epoch}
    return api.history(args.room, since, args.limit, args.reverse)


# --- argument helpers --------------------------------------------------------------------------


def _set(parser: argparse.ArgumentParser, call: Call) -> None:
    parser.set_defaults(func=lambda args: run(parser, call, args))


def _room(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--room", required=True, metavar="ROOM", help="the room")


def _data(parser: argparse.ArgumentParser) -> None:
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=_json, metavar="JSON",
                      help="the message data as a JSON value; '-': read it from stdin")
    data.add_argument("--text", dest="data", metavar="TEXT",
                      help="the message data as a string")


def _json(text: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def _http_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"must be http://host:port, not {text!r}")
    return text


# --- running -----------------------------------------------------------------------------------


def run(parser: argparse.ArgumentParser, call: Call, args: argparse.Namespace) -> int:
    """Make the call; print the reply (exit 0) or the error (exit 1). Usage errors exit 2."""
    if not args.key:
        parser.error("an API key is needed: --key or $ROOMCAST_API_KEY")
    if args.method == "history" and (args.since_offset is None) != (args.since_epoch is None):
        parser.error("--since-offset and --since-epoch go together")
    try:
        result = call(ApiClient(args.url, args.key, timeout=args.timeout), args)
    except ApiError as exc:
        print(f"roomcast api: {exc}", file=sys.stderr, flush=True)
        return 1
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    sys.stdout.flush()
    return 0
