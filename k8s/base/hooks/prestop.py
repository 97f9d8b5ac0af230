"""preStop hook of a roomcast node pod: start the drain, so that readiness is off at once.

The kubelet runs this inside the node's container (same image, same environment) when the pod
is deleted, and sends SIGTERM only when it returns. It

1. reads the node's settings the way the node does (``roomcast.config.load_config`` on the same
   environment: internal port, admin token file);
2. POSTs ``/admin/drain`` to the node on 127.0.0.1: from that moment ``/readyz`` answers 503 and
   new handshakes get 503 (the balancer retries them on another pod) while the endpoint removal
   propagates;
3. returns as soon as ``/readyz`` says 503 (a second or two at most).

The kubelet's SIGTERM then reaches a node that is draining already, and changes nothing: only a
second signal stops a node at once with 1001 (app.Node._on_signal; tests/test_k8s_rehearsal.py
checks it). The node closes its connections with 1012 over the drain window and exits 0 by
itself, within terminationGracePeriodSeconds. The hook does not wait for that: a hook still
running when the node exits is killed with the container, which the kubelet reports as a
FailedPreStopHook event on every rollout.

Exit 0 when the drain runs (or no node answered: nothing to hand over). Exit 1 when it could not
be started; the kubelet records the message as a FailedPreStopHook event, and its SIGTERM then
starts the same drain. Progress goes to stdout and to ``--log`` (the manifest passes PID 1's
stdout, so that the lines appear in ``kubectl logs`` next to the node's own), one JSON object per
line.
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

POLL = 0.1  # seconds between two looks at /readyz
CONFIRM_WITHIN = 2.0  # seconds for /readyz to turn 503 (it does at once; this is a bound)
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
    hook.log("prestop drain started", url=base)
    deadline = time.monotonic() + CONFIRM_WITHIN
    while True:
        try:
            ready, _ = request(base + "/readyz")
        except OSError:
            ready = 0  # Gone already: a drain with no connection left ends quickly.
        if ready != 200 or time.monotonic() > deadline:
            hook.log("prestop done", readiness=ready or "no answer",
                     level="info" if ready != 200 else "warning")
            return 0
        time.sleep(POLL)


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
