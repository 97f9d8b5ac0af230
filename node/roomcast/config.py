"""Every node setting, in one frozen dataclass, read from flags and environment in one function.

Each field is a flag ``--field-name`` and an environment variable ``ROOMCAST_FIELD_NAME``; a flag
wins over the environment, which wins over the default. README.md's configuration table is
generated from the same metadata (``python -m roomcast.config`` prints it). Every timeout a node
uses is a field here, or a named constant with a comment saying why it is not a setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import secrets
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "ROOMCAST_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# The same rule as protocol.ROOM_RE (not imported: config stays free of protocol imports).
_ROOM_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


def default_node_id() -> str:
    """Hostname plus a random suffix, so two nodes on one host never collide."""
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class Config:
    """A node's settings. Immutable: a running node never changes its configuration."""

    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0 for all interfaces).")
    port: int = _opt(8000, "TCP port to listen on; 0 picks a free one (logged on start).")
    node_id: str = _opt("", "Unique node name; default: hostname plus a random suffix.")
    redis_url: str | None = _opt(
        None, "redis:// URL of the shared Redis; absent = embedded mode, one node on its own. "
        "Several URLs, comma-separated: client-side sharding, each room's messages and history "
        "on one of them (jump consistent hash), presence and node state on the first."
    )
    redis_prefix: str = _opt("roomcast", "Prefix of every Redis key and channel name.")
    redis_timeout: float = _opt(
        5.0, "Seconds a Redis command or subscription may take before it counts as failed "
        "(the client then gets 'unavailable'); also the start-up wait for Redis."
    )
    redis_connect_timeout: float = _opt(2.0, "Seconds to open a connection to Redis.")
    redis_pool_size: int = _opt(
        64, "Connections a node opens to Redis for commands; a request waits (up to "
        "--redis-timeout) for a free one instead of failing."
    )
    redis_retry_max: float = _opt(
        5.0, "Longest pause between reconnect attempts to Redis (full jitter, doubling from "
        "0.1 s)."
    )
    redis_cluster: bool = _opt(
        False, "The --redis-url names a seed node of a Redis Cluster: rooms spread over "
        "--redis-partitions partitions with sharded pub/sub (SPUBLISH/SSUBSCRIBE)."
    )
    redis_partitions: int = _opt(
        128, "With --redis-cluster: partitions the rooms are spread over (a stable hash); each "
        "is a hash tag and one sharded channel. The same on every node; changing it moves "
        "every room's keys."
    )
    log_format: str = _opt(
        "auto", "Log output: json, console, or auto (console on a tty, JSON otherwise).",
        choices=("auto", "json", "console"),
    )
    log_level: str = _opt("info", "Minimum log level: debug, info, warning, error.")
    # Limits and abuse control.
    max_message_size: int = _opt(65536, "Largest frame a client may send, bytes; larger: 1009.")
    rate_limit: float = _opt(20.0, "Messages per second a connection may send (token bucket).")
    rate_burst: int = _opt(40, "Token bucket size: messages a connection may send at once.")
    flood_close_after: int = _opt(
        20, "Rate-limited messages in a row after which the connection is closed with 1008."
    )
    max_rooms_per_connection: int = _opt(100, "Rooms one connection may be in at once.")
    ping_interval: float = _opt(20.0, "Seconds between protocol-level pings; 0 disables them.")
    ping_timeout: float = _opt(20.0, "Seconds to wait for a pong before dropping the peer.")
    max_send_buffer: int = _opt(
        1048576, "Bytes queued to one client before it counts as a slow consumer (closed 4000)."
    )
    close_timeout: float = _opt(
        5.0, "Seconds to wait for a client's closing handshake (and, at shutdown, for all of "
        "them) before the connection is dropped."
    )
    compression: bool = _opt(
        False, "Offer permessage-deflate. Off by default: it costs CPU and memory per connection."
    )
    # Fan-out and presence.
    unsubscribe_linger: float = _opt(
        2.0, "Seconds a room stays subscribed on Redis after its last local member leaves."
    )
    presence_grace: float = _opt(
        5.0, "Seconds a user may be gone before user_left is sent (reconnects in time: no flap)."
    )
    node_lease_ttl: float = _opt(
        5.0, "Seconds a node's lease lives without a refresh; a dead node vanishes after it."
    )
    history_size: int = _opt(100, "Messages kept per room for history and recovery; 0 = none.")
    history_ttl: float = _opt(
        86400.0, "Seconds a room's history lives after its last publication; 0 = no expiry."
    )
    idle_room_ttl: float = _opt(
        300.0, "Seconds the state of a room that was only read or joined, never published to, "
        "is kept (memory and Redis); a publication extends it to --history-ttl."
    )
    max_reply_size: int = _opt(
        1048576, "Bytes of messages in one history reply; a longer history comes in pages "
        "(the reply says more: true)."
    )
    tutorial_room: str = _opt("chat", "Room of the python-websockets tutorial dialect on '/'.")
    max_nick_length: int = _opt(20, "Nicknames are stripped and cut to this many characters.")
    max_chat_length: int = _opt(500, "Tutorial-dialect chat text is cut to this many characters.")
    # Identity (docs/PROTOCOL.md, "Authentication").
    auth: str = _opt(
        "none", "How clients are identified: none (the user_id/username the client names, "
        "unverified: development only) or jwt (a signed token; production).",
        choices=("none", "jwt"),
    )
    jwt_secret: str | None = _opt(
        None, "HMAC secret (HS256/384/512) that connection and room tokens are signed with; "
        "at least 32 characters."
    )
    jwt_secret_file: str | None = _opt(
        None, "File of HMAC secrets, one per line, every one accepted (key rotation); re-read "
        "when it changes."
    )
    jwt_public_key: str | None = _opt(
        None, "PEM file of RSA, ECDSA or Ed25519 public keys (RS*, PS*, ES*, EdDSA); several "
        "keys may follow each other (rotation); re-read when it changes."
    )
    jwks_url: str | None = _opt(
        None, "JWKS URL of the identity provider's public keys; cached, and fetched again for "
        "a token whose kid is unknown."
    )
    jwt_audience: str | None = _opt(None, "Required aud claim of every token; absent = aud "
                                    "is not checked.")
    jwt_issuer: str | None = _opt(None, "Required iss claim of every token; absent = iss is "
                                  "not checked.")
    jwt_leeway: float = _opt(5.0, "Seconds of clock skew allowed when checking exp, nbf and iat.")
    refresh_grace: float = _opt(
        25.0, "Seconds a client has after its token expired (refresh_required) to send a "
        "refresh; then it is closed with 4002."
    )
    auth_timeout: float = _opt(
        10.0, "Seconds a client that brought no token in the URL or a header has to send its "
        "connect frame; then it is closed with 4501."
    )
    allow_anonymous: bool = _opt(
        False, "With --auth jwt, let clients without a token connect as anonymous users (they "
        "may only join namespaces whose join rule is anyone)."
    )
    allowed_origins: tuple[str, ...] = _opt(
        (), "Comma-separated Origin patterns (glob, e.g. https://*.example.com) a browser may "
        "connect from; none = any origin with --auth none, the node's own host with --auth jwt."
    )
    namespaces_file: str | None = _opt(
        None, "TOML file of room namespaces and their permissions and options; absent = every "
        "room is in the default namespace."
    )
    # Connection limits.
    backlog: int = _opt(
        2048, "Connections the kernel queues for the node before it accepts them (the listen "
        "backlog, capped by net.core.somaxconn); past it the SYNs of a connect storm are dropped "
        "and clients retry after 1 s or more."
    )
    max_connections: int = _opt(
        0, "Connections this node accepts; a handshake past it gets HTTP 503 (the balancer "
        "tries another node). 0 = no limit."
    )
    max_connections_per_address: int = _opt(
        0, "Connections one client address may hold on this node (after --trusted-proxies); "
        "past it: HTTP 429. 0 = no limit."
    )
    max_connections_per_user: int = _opt(
        0, "Connections one user may hold across the cluster; past it the connection is "
        "closed with 4503. 0 = no limit."
    )
    handshake_rate: float = _opt(
        0.0, "WebSocket handshakes per second one client address may make (token bucket); "
        "past it: HTTP 429 with Retry-After. 0 = no limit."
    )
    handshake_burst: int = _opt(20, "Handshakes one address may make at once (the bucket "
                                "size of --handshake-rate).")
    presence_diff_above: int = _opt(
        100, "Members on a node above which a room's user_joined/user_left go to them as one "
        "presence_diff per --presence-diff-interval (0: always single events)."
    )
    presence_diff_interval: float = _opt(
        0.2, "Seconds a large room's presence events are gathered into one presence_diff; "
        "a room of more than 2,500 x this many members on the node waits members / 2,500 s "
        "(a diff is one write per member)."
    )
    typing_interval: float = _opt(
        1.0, "Seconds between two typing events relayed for one connection and room; typing "
        "frames in between are dropped, not counted as flooding."
    )
    # The server API on the internal port (docs/API.md).
    api_host: str = _opt(
        "127.0.0.1", "Address of the internal port (server API, /livez, /readyz, /metrics, "
        "admin): the pod's or loopback address, never one the balancer exposes."
    )
    api_port: int = _opt(9000, "Internal port; 0 picks a free one (logged on start).")
    api_key: tuple[str, ...] = _opt(
        (), "Comma-separated keys of the server API (several valid at once: rotation); none "
        "and no --api-key-file = the API is off (404)."
    )
    api_key_file: str | None = _opt(
        None, "File of server API keys, one per line, every one valid; re-read when it changes."
    )
    api_max_body: int = _opt(1048576, "Largest server API request body, bytes; larger: 413.")
    api_max_batch: int = _opt(100, "Most commands in one server API batch.")
    api_rate: float = _opt(
        1000.0, "Server API requests per second one key may make (token bucket of twice "
        "that); past it: 429 with Retry-After."
    )
    api_timeout: float = _opt(
        10.0, "Seconds a server API client has to send a whole request (slow clients are "
        "dropped) and the API has to answer one."
    )
    idempotency_window: float = _opt(
        300.0, "Seconds a publish's idempotency_key is remembered per room: a retry within it "
        "returns the first result and publishes nothing."
    )
    public_rest: bool = _opt(
        True, "Serve GET /api/stats and GET /api/rooms/{room}/members on the client port (the "
        "FastAPI tutorial's REST endpoints, cached for a second)."
    )
    # Drain and operations.
    drain_delay: float = _opt(5.0, "Seconds between readiness off and the first 1012 close.")
    drain_window: float = _opt(10.0, "Seconds over which connections are closed in batches.")
    admin_token: str | None = _opt(
        None, "Bearer token for /admin/ endpoints on the internal port; absent = admin "
        "endpoints are disabled."
    )
    admin_token_file: str | None = _opt(
        None, "File whose first line is the admin token (instead of --admin-token)."
    )
    trusted_proxies: tuple[str, ...] = _opt(
        (), "Comma-separated proxy addresses or CIDR ranges (10.0.0.0/8) whose "
        "X-Forwarded-For is believed."
    )

    def __post_init__(self) -> None:
        if not self.node_id:
            object.__setattr__(self, "node_id", default_node_id())
        problems = [
            f"--{name.replace('_', '-')} ({ENV_PREFIX}{name.upper()}) {rule}"
            for name, ok, rule in self._rules()
            if not ok
        ]
        if problems:
            raise ValueError("; ".join(problems))

    def _rules(self) -> list[tuple[str, bool, str]]:
        """(field, valid?, what a valid value is) for every constrained setting."""
        rules: list[tuple[str, bool, str]] = [
            ("port", 0 <= self.port <= 65535, "must be from 0 to 65535"),
            ("backlog", 1 <= self.backlog <= 65535, "must be from 1 to 65535"),
            ("max_message_size", self.max_message_size >= 256, "must be at least 256 bytes"),
            ("max_send_buffer", self.max_send_buffer >= 1024, "must be at least 1024 bytes"),
            ("rate_burst", self.rate_burst >= 1, "must be at least 1"),
            ("flood_close_after", self.flood_close_after >= 1, "must be at least 1"),
            ("max_rooms_per_connection", self.max_rooms_per_connection >= 1,
             "must be at least 1"),
            ("history_size", self.history_size >= 0, "must be 0 or more"),
            ("redis_pool_size", self.redis_pool_size >= 2, "must be at least 2"),
            ("redis_partitions", 1 <= self.redis_partitions <= 16384, "must be 1 to 16384"),
            ("redis_cluster", not self.redis_cluster or self.redis_url is not None,
             "needs --redis-url (a seed node of the cluster)"),
            ("max_reply_size", self.max_reply_size >= 1024, "must be at least 1024 bytes"),
            ("max_nick_length", self.max_nick_length >= 1, "must be at least 1"),
            ("max_chat_length", self.max_chat_length >= 1, "must be at least 1"),
            ("log_format", self.log_format in ("auto", "json", "console"),
             "must be auto, json or console"),
            ("log_level", self.log_level.lower() in LOG_LEVELS,
             "must be one of " + ", ".join(LOG_LEVELS)),
            ("redis_url", self.redis_url is None or all(url.startswith(
                ("redis://", "rediss://", "unix://")) for url in self.redis_urls),
             "must start with redis://, rediss:// or unix:// (each URL of a list)"),
            ("redis_url", not self.redis_cluster or len(self.redis_urls) <= 1,
             "names one seed node with --redis-cluster (a Redis Cluster shards itself)"),
            ("tutorial_room", _ROOM_RE.fullmatch(self.tutorial_room) is not None,
             "must be 1-64 characters of letters, digits and _ . : -"),
            ("auth", self.auth in ("none", "jwt"), "must be none or jwt"),
            ("auth", self.auth != "jwt" or any(
                (self.jwt_secret, self.jwt_secret_file, self.jwt_public_key, self.jwks_url)),
             "jwt needs a key: --jwt-secret, --jwt-secret-file, --jwt-public-key or --jwks-url"),
            ("jwt_secret", self.jwt_secret is None or len(self.jwt_secret) >= 32,
             "must be at least 32 characters (RFC 7518 section 3.2: a key as long as the hash)"),
            ("jwks_url", self.jwks_url is None or self.jwks_url.startswith(
                ("https://", "http://")), "must be an http:// or https:// URL"),
            ("handshake_burst", self.handshake_burst >= 1, "must be at least 1"),
            ("api_port", 0 <= self.api_port <= 65535, "must be from 0 to 65535"),
            ("api_key", all(len(key) >= 32 for key in self.api_key),
             "keys must be at least 32 characters each (as in --api-key-file)"),
            ("api_max_body", self.api_max_body >= 1024, "must be at least 1024 bytes"),
            ("api_max_batch", self.api_max_batch >= 1, "must be at least 1"),
        ]
        for name in ("max_connections", "max_connections_per_address", "presence_diff_above",
                     "max_connections_per_user"):
            rules.append((name, getattr(self, name) >= 0, "must be 0 (no limit) or more"))
        # NaN passes every comparison's negation, so finiteness is checked first.
        positive = ("rate_limit", "node_lease_ttl", "redis_timeout", "redis_connect_timeout",
                    "presence_diff_interval", "redis_retry_max", "close_timeout",
                    "idle_room_ttl", "auth_timeout", "api_rate", "api_timeout",
                    "idempotency_window")
        non_negative = ("ping_interval", "ping_timeout", "unsubscribe_linger",
                        "presence_grace", "history_ttl", "drain_delay", "drain_window",
                        "jwt_leeway", "refresh_grace", "handshake_rate", "typing_interval")
        for name in positive:
            value = getattr(self, name)
            rules.append((name, math.isfinite(value) and value > 0,
                          "must be a finite number above 0"))
        for name in non_negative:
            value = getattr(self, name)
            rules.append((name, math.isfinite(value) and value >= 0,
                          "must be a finite number, 0 or more"))
        return rules

    @property
    def redis_urls(self) -> list[str]:
        """The Redis URLs of --redis-url: one, or the shards of client-side sharding."""
        if self.redis_url is None:
            return []
        return [url.strip() for url in self.redis_url.split(",") if url.strip()]

    @property
    def clustered(self) -> bool:
        """True when the node shares state through Redis."""
        return self.redis_url is not None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(f.type)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return _parse_bool(raw)
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind == "str | None":
        return raw or None
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per Config field to ``parser`` (all default to None = not given)."""
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} [env {env}, default {_show_default(f)}]"
        # A boolean may stand alone (--redis-cluster) or take a value (--compression off).
        extra: dict[str, Any] = (
            {"nargs": "?", "const": "true"} if f.type in (bool, "bool") else {})
        parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                            help=help_text, **extra)


def _show_default(f: dataclasses.Field[Any]) -> str:
    if f.name == "node_id":
        return "hostname-random"
    value = f.default
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return "none" if value is None else str(value)


def load_config(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build the Config from parsed flags and the environment (flags win).

    Raises ValueError with a one-line, user-facing message for any bad value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        raw = getattr(args, f.name, None) if args is not None else None
        source = "--" + f.name.replace("_", "-")
        if raw is None:
            raw = environ.get(ENV_PREFIX + f.name.upper())
            source = ENV_PREFIX + f.name.upper()
        if raw is None:
            continue
        try:
            values[f.name] = _convert(f, raw)
        except ValueError:
            raise ValueError(f"{source}: invalid value {raw!r}") from None
    if values.get("admin_token_file") and not values.get("admin_token"):
        values["admin_token"] = read_secret_file(values["admin_token_file"], "--admin-token-file")
    return Config(**values)


def read_secret_file(path: str, flag: str) -> str:
    """The first non-empty line of a secret file (a mounted Kubernetes secret, say).

    Raises ValueError naming ``flag`` when it cannot be read or holds no line.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    secret = next((line for line in lines if line), "")
    if not secret:
        raise ValueError(f"{flag}: {path} is empty")
    return secret


def markdown_table() -> str:
    """The README configuration table, generated from the fields' metadata."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        rows.append(
            f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` "
            f"| `{_show_default(f)}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the configuration table (used to keep README.md in step)."""
    del argv
    sys.stdout.write(markdown_table() + "\n")


if __name__ == "__main__":
    main()
