"""npm packages of the socket.io reference, installed on demand into a cache, never into the repo.

``ensure_installed`` runs ``npm ci`` on a copy of ``loadtest/socketio/package.json`` and its
committed ``package-lock.json`` (exact versions and integrity hashes) in
``$XDG_CACHE_HOME/roomcast/socketio-<hash>`` (``~/.cache/...`` by default), where the hash is of
both files: a changed lockfile gets a fresh directory, an unchanged one is installed once. Only
``python -m loadtest.bench --socketio`` calls it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from roomcast.tools.procs import find_binary

PACKAGE_DIR = Path(__file__).resolve().parent / "socketio"
MANIFESTS = ("package.json", "package-lock.json")
MIN_NODE = 18
INSTALL_TIMEOUT = 300.0
STAMP = ".installed"


class NpmError(RuntimeError):
    """node or npm is missing, too old, or ``npm ci`` failed; the message is one line."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "roomcast"


def lock_hash(package_dir: Path = PACKAGE_DIR) -> str:
    """12 hex digits of SHA-256 over package.json and package-lock.json."""
    digest = hashlib.sha256()
    for name in MANIFESTS:
        digest.update((package_dir / name).read_bytes())
    return digest.hexdigest()[:12]


def install_dir(package_dir: Path = PACKAGE_DIR, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"socketio-{lock_hash(package_dir)}"


def node_binary() -> str:
    """The path of ``node`` (18 or newer); NpmError naming what is missing."""
    node = find_binary("node")
    if node is None:
        raise NpmError("--socketio needs Node.js 18+ and npm on PATH (e.g. apt-get install "
                       "nodejs npm); node was not found")
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise NpmError(f"--socketio: {node} --version failed: {exc}") from None
    match = re.match(r"v(\d+)\.", version)
    if not match or int(match.group(1)) < MIN_NODE:
        raise NpmError(f"--socketio needs Node.js {MIN_NODE}+, {node} is {version or 'unknown'}")
    return node


def npm_binary() -> str:
    npm = find_binary("npm")
    if npm is None:
        raise NpmError("--socketio needs npm on PATH to install socket.io (e.g. apt-get install "
                       "npm); npm was not found")
    return npm


def is_installed(package_dir: Path = PACKAGE_DIR, root: Path | None = None) -> bool:
    return (install_dir(package_dir, root) / STAMP).is_file()


def ensure_installed(
    package_dir: Path = PACKAGE_DIR, root: Path | None = None,
    say: Callable[[str], None] = lambda _text: None, timeout: float = INSTALL_TIMEOUT,
) -> Path:
    """The ``node_modules`` directory of the pinned packages, running ``npm ci`` when absent.

    The install goes to a temporary sibling directory that is renamed into place once complete,
    so an interrupted install is never taken for a finished one. Raises NpmError.
    """
    node_binary()
    target = install_dir(package_dir, root)
    if (target / STAMP).is_file():
        return target / "node_modules"
    npm = npm_binary()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.with_name(f".{target.name}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        for name in MANIFESTS:
            shutil.copyfile(package_dir / name, work / name)
        say(f"installing socket.io from npm (npm ci) into {target}")
        # --ignore-scripts: none of the pinned packages needs an install script.
        cmd = [npm, "ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund",
               "--prefer-offline", "--loglevel=error"]
        try:
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise NpmError(f"npm ci did not finish within {timeout:.0f} s (registry "
                           "unreachable?)") from None
        if proc.returncode != 0:
            raise NpmError(f"npm ci failed with exit code {proc.returncode}: "
                           f"{npm_failure(proc.stderr + proc.stdout)}")
        (work / STAMP).write_text(lock_hash(package_dir) + "\n")
        if target.exists() and not (target / STAMP).is_file():
            shutil.rmtree(target, ignore_errors=True)  # Left by an older, broken install.
        try:
            work.rename(target)
        except OSError:  # Another bench installed it meanwhile: keep theirs.
            if not (target / STAMP).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / "node_modules"


def npm_failure(output: str) -> str:
    """One line out of npm's error output: its error code and the first message line."""
    lines = [re.sub(r"^npm (error|ERR!) ?", "", ln).strip() for ln in output.splitlines()]
    lines = [ln for ln in lines if ln]
    code = next((ln.split()[1] for ln in lines if ln.startswith("code ") and len(ln.split()) > 1),
                None)
    skip = ("code ", "syscall ", "errno ", "at ", "A complete log", "}", "{")
    message = next((ln for ln in lines if not ln.startswith(skip) and ":" in ln),
                   lines[-1] if lines else "no output")
    return f"{code}: {message}" if code else message


def registry_reachable(timeout: float = 20.0) -> bool:
    """``npm ping`` succeeds: npm can reach its configured registry."""
    npm = find_binary("npm")
    if npm is None:
        return False
    try:
        return subprocess.run([npm, "ping"], capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
