"""Helpers for the processes roomcast's tools start on this machine (redis-server, nginx, nodes)."""

from __future__ import annotations

import shutil
import socket

#: Where Debian puts daemons; a normal user's PATH often lacks these.
SBIN_PATH = "/usr/sbin:/sbin:/usr/local/sbin"


def find_binary(name: str) -> str | None:
    """The path of a system binary, looked up on PATH and then in the sbin directories."""
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out on ``host``. It is closed again before use, so another
    process may take it first: callers retry a start that fails to bind."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
