"""nginx in front of roomcast nodes: the config renderer, a dev certificate, and the process.

``render()`` fills ``nginx.conf.template`` (beside this module): ``least_conn`` over the nodes'
client ports, WebSocket upgrade headers and ``X-Forwarded-*``. A handshake that a draining node
refuses with 503 is retried on another node; a request that reached a node is sent to another
one only when it is idempotent and the node could not answer it (never a POST), and a node is
skipped only after ``MAX_FAILS`` failures, which no single request can cause
(balancer/README.md, "Retries and failed nodes"). Only ``/``, ``/ws``, ``/ws/chat/``, ``/api/``
and ``/healthz`` are proxied; ``/metrics``, ``/admin/`` and the rest answer 404. The nodes'
internal ports (``--api-port``) are never upstreams.

``Balancer`` runs that nginx as a child process whose pid file, logs and temp files all live in
one run directory: it checks the config with ``nginx -t``, starts nginx in the foreground, waits
until it answers, reloads it with a new node list, and stops it by PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import secrets
import shutil
import signal
import string
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from roomcast.tools.procs import find_binary, free_port

#: Shipped inside the package, so that `roomcast cluster` works from an installed wheel too.
TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"
PROXY_TIMEOUT = "75s"  # Longer than the nodes' 20 s ping interval.
WORKER_CONNECTIONS = 4096  # Two per proxied WebSocket: one to the client, one to the node.
PORT_ATTEMPTS = 3  # Ephemeral ports are picked before nginx binds them: retry a lost race.
#: Failed attempts (a refused or reset connection, a timeout, a handshake's 503) after which
#: nginx skips a node for FAIL_TIMEOUT. nginx tries a node at most once per request, so one
#: request counts at most one failure against it: with 3, no single request takes a node out,
#: while a dead node is skipped after its first 3 (each retried on another node).
MAX_FAILS = 3
#: The window in which those failures add up, and how long a failed node is then skipped
#: before one request probes it again: a dead node costs one retried connect per 5 s.
FAIL_TIMEOUT = "5s"
# Characters that would end or change a quoted nginx string ($ starts a variable).
_UNSAFE_PATH = re.compile(r'["$\\;{}\s]')


class BalancerError(RuntimeError):
    """The balancer could not do what was asked; the message is one line for a user."""


class _Template(string.Template):
    # nginx owns "$": placeholders are @{name}, and "@@" is a literal "@".
    delimiter = "@"


def find_nginx() -> str:
    """The nginx binary: on PATH, or in an sbin directory a user's PATH may lack."""
    found = find_binary("nginx")
    if found is None:
        raise BalancerError("nginx is not installed (Debian/Ubuntu: apt-get install nginx-light)")
    return found


def _path(value: str | os.PathLike[str]) -> str:
    text = str(Path(value).resolve())
    if _UNSAFE_PATH.search(text):
        raise ValueError(f"path not usable in an nginx config (quote, $, ; or space): {text}")
    return text


def _user_directive() -> str:
    # As root, nginx would run its worker as "nobody", which may not write the run directory's
    # temp paths (pytest's tmp dirs are mode 0700): keep the worker as the current user. Not as
    # root, nginx cannot switch users and warns about the directive, so it is left out.
    if os.geteuid() != 0:
        return "# user: not root, so the worker runs as the current user."
    import grp
    import pwd

    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


def _rlimit_nofile(worker_connections: int) -> int:
    wanted = 2 * worker_connections + 64
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def render(
    upstream_ports: Sequence[int], http_port: int, https_port: int,
    rundir: str | os.PathLike[str], cert: str | os.PathLike[str], key: str | os.PathLike[str],
    *, host: str = "127.0.0.1", generation: int = 1,
    worker_connections: int = WORKER_CONNECTIONS,
) -> str:
    """The nginx config for nodes whose client ports (``--port``) are
    ``127.0.0.1:<upstream_ports>``.

    nginx listens on ``host:http_port`` (ws://, http://) and ``host:https_port`` (wss://, with
    ``cert``/``key``); ``rundir`` gets its pid file, logs and temp files. ``generation`` is
    served on the loopback-only ``/_balancer/generation``, to tell when a reload took effect.
    Raises ValueError for no upstreams, a bad port or a path nginx cannot take.
    """
    ports = list(upstream_ports)
    if not ports:
        raise ValueError("at least one upstream node port is needed")
    for port in [*ports, http_port, https_port]:
        if not 0 < port <= 65535:
            raise ValueError(f"not a usable port: {port}")
    if http_port == https_port:
        raise ValueError(f"the ws and wss ports must differ (both {http_port})")
    servers = "\n".join(
        f"        server 127.0.0.1:{port} max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT};"
        for port in ports
    )
    return _Template(TEMPLATE.read_text()).substitute(
        user_directive=_user_directive(),
        rlimit_nofile=_rlimit_nofile(worker_connections),
        worker_connections=worker_connections,
        rundir=_path(rundir),
        servers=servers,
        proxy_timeout=PROXY_TIMEOUT,
        host=host,
        http_port=http_port,
        https_port=https_port,
        cert=_path(cert),
        key=_path(key),
        generation=generation,
    )


def check_config(conf: Path, rundir: Path, nginx: str | None = None) -> None:
    """Run ``nginx -t`` on ``conf``; raise BalancerError with nginx's first error line."""
    binary = nginx or find_nginx()
    try:
        result = subprocess.run(
            [binary, "-t", "-q", "-c", str(conf), "-p", f"{rundir}/"],
            capture_output=True, text=True, timeout=15, check=False,
        )
    except subprocess.TimeoutExpired:
        raise BalancerError(f"nginx -t did not finish within 15 s for {conf}") from None
    if result.returncode != 0:
        raise BalancerError(f"nginx rejected {conf}: {_first_error(result.stderr)}")


def _first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if any(level in line for level in ("[emerg]", "[alert]", "[crit]")):
            return line.removeprefix("nginx: ")
    return lines[-1].removeprefix("nginx: ") if lines else "no error text"


# --- a development certificate authority ---------------------------------------------------

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = roomcast local development CA
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def ensure_dev_certificate(directory: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(ca_cert, cert, key)`` in ``directory``: a local CA and a server certificate for
    127.0.0.1 and localhost signed by it, made with the ``openssl`` CLI on first use and reused
    while valid. Trust ``ca_cert`` in a client (and nothing else) to use wss:// locally.
    """
    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key = folder / "server.pem", folder / "server.key"
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BalancerError("openssl is not installed; it makes the development certificate")
    ca_ok = ca.exists() and ca_key.exists() and _valid_for_a_day(openssl, ca)
    if ca_ok and cert.exists() and key.exists() and _valid_for_a_day(openssl, cert) and (
        _run_openssl(openssl, "verify", "-CAfile", str(ca), str(cert), check=False)
    ):
        return ca, cert, key
    with tempfile.TemporaryDirectory(dir=folder, prefix=".new-") as scratch:
        work = Path(scratch)
        config = work / "openssl.cnf"
        config.write_text(_OPENSSL_CONFIG)
        if not ca_ok:
            _run_openssl(openssl, "req", "-x509", *_EC_KEY, "-config", str(config),
                         "-extensions", "v3_ca", "-days", "3650",
                         "-keyout", str(work / "ca.key"), "-out", str(work / "ca.pem"))
            os.chmod(work / "ca.key", 0o600)
            os.replace(work / "ca.key", ca_key)
            os.replace(work / "ca.pem", ca)
        _run_openssl(openssl, "req", "-new", *_EC_KEY, "-config", str(config),
                     "-subj", "/CN=localhost", "-keyout", str(work / "server.key"),
                     "-out", str(work / "server.csr"))
        _run_openssl(openssl, "x509", "-req", "-in", str(work / "server.csr"),
                     "-CA", str(ca), "-CAkey", str(ca_key),
                     "-set_serial", "0x" + secrets.token_hex(16), "-days", "825",
                     "-extfile", str(config), "-extensions", "v3_server",
                     "-out", str(work / "server.pem"))
        os.chmod(work / "server.key", 0o600)
        os.replace(work / "server.key", key)
        os.replace(work / "server.pem", cert)
    return ca, cert, key


def _valid_for_a_day(openssl: str, cert: Path) -> bool:
    return _run_openssl(openssl, "x509", "-checkend", "86400", "-noout", "-in", str(cert),
                        check=False)


def _run_openssl(openssl: str, *args: str, check: bool = True) -> bool:
    result = subprocess.run([openssl, *args], capture_output=True, text=True, timeout=30,
                            check=False)
    if check and result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no error text"])[-1]
        raise BalancerError(f"openssl {args[0]} failed: {detail}")
    return result.returncode == 0


# --- processes -------------------------------------------------------------------------------

def stop_process(
    proc: subprocess.Popen[bytes], first: signal.Signals | None, timeout: float,
    hurry: Callable[[], bool] | None = None,
) -> int:
    """Send ``first`` (None: it was sent already) to ``proc`` by PID and wait up to ``timeout``
    seconds, or until ``hurry()`` is true; then SIGKILL its process group. Returns the exit status.

    ``proc`` must have been started with ``start_new_session=True``: its group is its own, so the
    group kill reaches only it and its children (nginx's workers).
    """
    if proc.poll() is not None:
        return proc.returncode
    if first is not None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(first)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (hurry is not None and hurry()):
        if proc.poll() is not None:
            return proc.returncode
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=10)


class Balancer:
    """One nginx process in front of ``upstream_ports``; ``start()``, ``reload()``, ``stop()``.

    Ports 0 are replaced by free ephemeral ports at ``start()``. Every wait is bounded.
    """

    def __init__(
        self, rundir: str | os.PathLike[str], upstream_ports: Iterable[int], *,
        cert: str | os.PathLike[str], key: str | os.PathLike[str],
        http_port: int = 0, https_port: int = 0, host: str = "127.0.0.1",
    ) -> None:
        if host not in ("127.0.0.1", "0.0.0.0"):
            # The readiness probe (/_balancer/generation) answers on loopback only.
            raise ValueError("the balancer listens on 127.0.0.1 or 0.0.0.0")
        self.rundir = Path(rundir).resolve()
        self.conf = self.rundir / "nginx.conf"
        self.upstream_ports = list(upstream_ports)
        self.cert, self.key = Path(cert), Path(key)
        self.host = host
        self.http_port, self.https_port = http_port, https_port
        self._wanted = (http_port, https_port)
        self.generation = 0
        self.nginx = find_nginx()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # --- addresses ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"

    @property
    def wss_url(self) -> str:
        return f"wss://127.0.0.1:{self.https_port}/ws"

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Balancer:
        """Check the config with ``nginx -t``, start nginx, wait until it answers."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        for attempt in range(PORT_ATTEMPTS):
            self.http_port = self._wanted[0] or free_port()
            self.https_port = self._wanted[1] or free_port()
            while self.https_port == self.http_port:
                self.https_port = free_port()
            self.generation = 1
            self._write_config(self.conf)
            self._mark_log()
            stderr = self.rundir / "nginx.stderr"
            with stderr.open("wb") as errors:
                self.proc = subprocess.Popen(
                    [self.nginx, "-c", str(self.conf), "-p", f"{self.rundir}/"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                    start_new_session=True,
                )
            try:
                self._wait_generation(timeout)
                return self
            except BalancerError as exc:
                self.stop()
                lost_race = "Address already in use" in str(exc) and 0 in self._wanted
                if not lost_race or attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def reload(self, upstream_ports: Iterable[int], timeout: float = 10.0) -> None:
        """Point nginx at ``upstream_ports``: check the new config, SIGHUP the master, and wait
        until the new workers answer. Connections already open stay where they are."""
        if self.proc is None or self.proc.poll() is not None:
            raise BalancerError("nginx is not running")
        ports = list(upstream_ports)
        candidate = self.conf.with_name("nginx.conf.new")
        self.generation += 1
        try:
            self._write_config(candidate, ports)
        except BaseException:
            self.generation -= 1
            raise
        os.replace(candidate, self.conf)
        self.upstream_ports = ports
        self._mark_log()
        # What `nginx -s reload` does: SIGHUP to the master's PID.
        self.proc.send_signal(signal.SIGHUP)
        self._wait_generation(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGQUIT (finish open requests and tunnels), then SIGKILL after ``timeout``."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGQUIT, timeout)

    def __enter__(self) -> Balancer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- helpers -----------------------------------------------------------------------------

    def _write_config(self, path: Path, ports: Sequence[int] | None = None) -> None:
        path.write_text(render(
            self.upstream_ports if ports is None else ports, self.http_port, self.https_port,
            self.rundir, self.cert, self.key, host=self.host, generation=self.generation,
        ))
        check_config(path, self.rundir, self.nginx)

    def _wait_generation(self, timeout: float) -> None:
        """Wait until two answers in a row come from workers running this generation."""
        assert self.proc is not None
        url = f"http://127.0.0.1:{self.http_port}/_balancer/generation"
        deadline = time.monotonic() + timeout
        in_a_row = 0
        while in_a_row < 2:
            if self.proc.poll() is not None:
                raise BalancerError(f"nginx exited with {self.proc.returncode}: {self._error()}")
            if time.monotonic() > deadline:
                raise BalancerError(
                    f"nginx did not serve config generation {self.generation} within "
                    f"{timeout:g} s: {self._error()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as reply:
                    current = reply.read().decode().strip() == str(self.generation)
            except (OSError, urllib.error.URLError):
                current = False
            in_a_row = in_a_row + 1 if current else 0
            time.sleep(0.02)

    def _error(self) -> str:
        """The first error nginx logged since the current start or reload began."""
        text = ""
        for name, offset in (("nginx.stderr", 0), ("error.log", self._log_offset)):
            with contextlib.suppress(OSError), (self.rundir / name).open("rb") as log:
                log.seek(offset)
                text += log.read().decode(errors="replace")
        for line in text.splitlines():
            if any(level in line for level in ("[emerg]", "[alert]", "[crit]")):
                # "2026/01/01 00:00:00 [emerg] 12#12: text" or "nginx: [emerg] text"
                line = re.sub(r"^(nginx: |[\d/]+ [\d:]+ )", "", line.strip())
                return re.sub(r"\] \d+#\d+: ", "] ", line)
        return "no error logged"

    def _mark_log(self) -> None:
        """Errors logged from now on belong to the operation that starts now."""
        try:
            self._log_offset = (self.rundir / "error.log").stat().st_size
        except OSError:
            self._log_offset = 0
