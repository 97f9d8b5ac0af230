"""preStop hook of a roomcast node pod: start the drain, then wait until it has moved every client.

The kubelet runs this inside the node's container (same image, same environment) when the pod
is deleted, and sends SIGTERM only when it returns. It

1. reads the node's settings the way the node does (``roomcast.config.load_config`` on the same
   environment: internal port, admin token file, drain timings);
2. POSTs ``/admin/drain`` to the node on 127.0.0.1: readiness turns 503 at once, new handshakes
   get 503 (the balancer retries them on another pod) while the endpoint removal propagates;
3. waits until the node holds no connection (``roomcast_connections`` in ``/metrics`` sums to 0,
   or the node stopped answering), at most ``drain_delay + drain_window + close_timeout`` plus
   2 s, and returns. The kubelet's SIGTERM that follows finds the drain done; had it come
   earlier it would have changed nothing either, since a drain already runs (app.Node: only a
   second signal stops at once with 1001).

Exit 0 when the drain ran (or the node was gone already). Exit 1 when it could not be started;
the kubelet records the message as a FailedPreStopHook event and its SIGTERM then starts the same
drain. Progress goes to stdout and to ``--log`` (the manifest passes PID 1's stdout, so that the
lines appear in ``kubectl logs`` next to the node's own), one JSON object per line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from roomcast.config import Config, load_config

POLL = 0.2  # seconds between two looks at /metrics
SLACK = 2.0  # seconds past the node's own drain bound before the hook stops waiting
REQUEST_TIMEOUT = 2.0


class Hook:
    def __init__(self, log_path: str | None) -> None:
        self.started = time.monotonic()
        self.log_path = log_path

    def log(self, event: str, **fields: Any) -> None:
        fields = {"event": event, "logger": "roomcast.prestop",
                  "seconds": round(time.monotonic() - self.started, 2), **fields}
        line = json.dumps(fields) + "\n"
        sys.stdout.write(line)
        sys.stdout.flush()
        if self.log_path:
            # Best effort: the container log is a nicety, the drain is not.
            with contextlib.suppress(OSError), open(self.log_path, "a") as log:
                log.write(line)


def request(url: str, token: str | None = None) -> tuple[int, bytes]:
    """(status, body); HTTP errors are answers too. Raises OSError when nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=b"" if token else None, headers=headers,
                                 method="POST" if token else "GET")
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None


def connections(metrics: bytes) -> int:
    """The sum of ``roomcast_connections{dialect=...}`` in a /metrics page."""
    total = 0.0
    for line in metrics.decode(errors="replace").splitlines():
        if line.startswith("roomcast_connections{") or line.startswith("roomcast_connections "):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def base_url(cfg: Config) -> str:
    host = cfg.api_host if cfg.api_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{cfg.api_port}"


def run(hook: Hook, cfg: Config) -> int:
    base = base_url(cfg)
    if not cfg.admin_token:
        hook.log("prestop cannot drain: no admin token (ROOMCAST_ADMIN_TOKEN_FILE); the "
                 "SIGTERM that follows starts the drain", level="error")
        return 1
    try:
        status, body = request(base + "/admin/drain", cfg.admin_token)
    except OSError as exc:
        hook.log("prestop found no node to drain", url=base, error=str(exc), level="warning")
        return 0  # Nothing listens: the node is gone already, there is nothing to hand over.
    if status != 202:
        hook.log("prestop drain refused", status=status, body=body[:200].decode(errors="replace"),
                 level="error")
        return 1
    bound = cfg.drain_delay + cfg.drain_window + cfg.close_timeout + SLACK
    hook.log("prestop drain started", url=base, wait_at_most=bound)
    deadline = hook.started + bound
    reported_ready: int | None = None
    left = -1
    while time.monotonic() < deadline:
        try:
            ready, _ = request(base + "/readyz")
            status, page = request(base + "/metrics")
        except OSError:
            hook.log("prestop done: the node stopped answering", level="info")
            return 0
        if ready != reported_ready:
            reported_ready = ready
            hook.log("prestop readiness", status=ready)
        left = connections(page) if status == 200 else -1
        if left == 0:
            hook.log("prestop done: no connection left", level="info")
            return 0
        time.sleep(POLL)
    hook.log("prestop stopped waiting; the drain goes on (SIGTERM does not cut it short)",
             connections=left, level="warning")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", metavar="PATH",
                        help="also append the progress lines here (e.g. /proc/1/fd/1)")
    args = parser.parse_args(argv)
    hook = Hook(args.log)
    try:
        cfg = load_config(None, os.environ)
    except ValueError as exc:
        hook.log("prestop cannot read the node's settings", error=str(exc), level="error")
        return 1
    return run(hook, cfg)


if __name__ == "__main__":
    sys.exit(main())
