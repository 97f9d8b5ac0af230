"""Who may open a WebSocket: every check made on the HTTP upgrade request, before it is accepted.

A refused handshake gets a plain HTTP answer, never an upgrade (docs/PROTOCOL.md, "Handshake"):

=====  ================================================================================
400    a ``user_id``/``username`` with a character that is not printable (--auth none)
401    a token in ``Authorization: Bearer`` or ``?token=`` that does not verify, or none where
       one is needed (``WWW-Authenticate: Bearer error="invalid_token"``, RFC 6750 section 3)
403    an ``Origin`` that --allowed-origins does not list (with --auth jwt and no list: another
       host than the one asked)
429    this address holds --max-connections-per-address, or made more than --handshake-rate
       handshakes a second (``Retry-After``)
503    the node holds --max-connections (the balancer tries another node), or it is draining;
       or the keys to check a token could not be had (a JWKS endpoint down)
=====  ================================================================================

``Gatekeeper.admit`` counts each accepted upgrade against its address and the node until the
TCP connection is lost (``release``, from ``AdmittedConnection.connection_lost``), so a
connection whose handshake fails later is never left counted.
"""

from __future__ import annotations

import collections
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets import http11
from websockets.datastructures import Headers
from websockets.exceptions import SecurityError
from websockets.http11 import Request, Response
from websockets.streams import StreamReader

from roomcast.config import Config
from roomcast.metrics import Metrics
from roomcast.service.auth import Authenticator, Claims, TokenError
from roomcast.service.ratelimit import TokenBucket

log = structlog.get_logger("roomcast.handshake")

#: The largest request head (request line and headers) the client port reads; a longer one
#: gets 431. Browsers send a few KiB; websockets' own limits (8 KiB a line, 128 headers) come
#: after this one.
MAX_HEAD = 16384
#: The reason phrases of every status the client port answers with.
REASONS: Final = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
                  403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
                  413: "Content Too Large", 429: "Too Many Requests",
                  431: "Request Header Fields Too Large", 503: "Service Unavailable"}

#: Heads that python-websockets' Request.parse surely takes, matched in one pass: a GET of an
#: ASCII target over HTTP/1.1 and at most its MAX_NUM_HEADERS well-formed header lines (its own
#: token and value classes, http11.py), the whole no longer than one of its lines may be
#: (MAX_LINE_LENGTH; both limits as the library read them from its environment). A head that
#: does not match, or that names a body, gets the full parse (``screen_head``).
_PLAIN_GET: Final = re.compile(
    rb"GET [\x21-\x7e]+ HTTP/1\.1\r\n"
    rb"(?:[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[\x09\x20-\x7e\x80-\xff]*\r\n){0,"
    + str(http11.MAX_NUM_HEADERS).encode() + rb"}\r\n")
_PLAIN_GET_MAX: Final = http11.MAX_LINE_LENGTH
_BODY_HEADERS: Final = re.compile(rb"\r\n(?:content-length|transfer-encoding)[ \t]*:", re.I)

#: Addresses whose handshake buckets are kept; the least recently seen go first beyond it, so
#: that a scan from many addresses costs bounded memory (a forgotten bucket starts full again).
MAX_TRACKED_ADDRESSES = 65536


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP answer instead of the upgrade."""

    status: int
    text: str
    #: The metric label (roomcast_handshakes_refused_total{reason}).
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target. An origin-form target (RFC 9112 section 3.2.1) is a
    path, never a URL: ``//api/x`` is the path ``//api/x``, where ``urlsplit`` would read a host
    ``api`` and the path ``/x`` (how ``//admin/...`` once reached an admin route)."""
    path, _, query = target.partition("?")
    return path, query


def single(headers: Any, name: str) -> str | None:
    """The one value of header ``name`` (None when absent); ValueError when it is repeated
    (which of two Origin or Authorization headers counts is anyone's guess: refuse)."""
    values = headers.get_all(name)
    if len(values) > 1:
        raise ValueError(f"repeated {name} header")
    return str(values[0]) if values else None


def screen_head(head: bytes) -> tuple[int, str] | None:
    """Whether a client-port request head (everything up to and including the blank line) may
    go on to the WebSocket library: None, or the (status, reason text) to answer instead.

    python-websockets parses the head with ``Request.parse`` and, for anything it cannot take
    (a body, a chunked body, a malformed line), drops the TCP connection without an answer,
    which a proxy counts as a failed node. The same parser runs here first, so a request passes
    exactly when the library would take it, and every other one gets a clean 4xx: 405 for a
    method other than GET with a body, 413 for a GET with a body, 431 for too large a head, 400
    for the rest. Requests without a body but with another method pass (the routes answer
    405).
    """
    if len(head) > MAX_HEAD:
        return 431, f"the request head is larger than {MAX_HEAD} bytes"
    if (len(head) <= _PLAIN_GET_MAX and _PLAIN_GET.fullmatch(head)
            and not _BODY_HEADERS.search(head)):
        return None  # The usual upgrade: what parse_verdict would say, in one match.
    return parse_verdict(head)


def parse_verdict(head: bytes) -> tuple[int, str] | None:
    """``screen_head``'s verdict from the library's own parser (``Request.parse``)."""
    reader = StreamReader()
    reader.feed_data(head)
    reader.feed_eof()
    parser = Request.parse(reader.read_line)
    try:
        while True:
            next(parser)
    except StopIteration:
        return None
    except SecurityError:  # A line or the header count over the library's own limits.
        return 431, "a request header line is too long, or there are too many"
    except (ValueError, NotImplementedError) as exc:
        method = head.split(b" ", 1)[0]
        # Exactly the library's two body refusals (http11.Request.parse); any other message
        # may quote the client's bytes and must not be read for words.
        if isinstance(exc, NotImplementedError) or str(exc) == "unsupported request body":
            if method != b"GET":
                return 405, "only GET is served on this port (the server API is internal)"
            return 413, "requests with a body are not served on this port"
        return 400, "malformed HTTP request"
    except (EOFError, UnicodeDecodeError):
        return 400, "malformed HTTP request"


def response(status: int, body: bytes, content_type: str,
             extra: tuple[tuple[str, str], ...] = ()) -> Response:
    """Every plain HTTP answer of the client port (the routes', the refused handshakes' and
    the screened requests'): it ends the connection (the library closes it anyway)."""
    headers = Headers([
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
        *extra,
    ])
    return Response(status, REASONS.get(status, "OK"), headers, body)


def text_response(status: int, text: str, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return response(status, text.encode() + b"\n", "text/plain; charset=utf-8", extra)


#: What a 405 says is served (RFC 9110 section 15.5.6: a 405 must list the allowed methods).
ALLOW_GET: Final = (("Allow", "GET"),)


def answer(status: int, text: str) -> bytes:
    """The raw bytes of a plain-text answer to a screened request, written before the library
    has the connection (so the Server header it adds to its own answers is added here)."""
    extra = ALLOW_GET if status == 405 else ()
    reply = text_response(status, text, (*extra, ("Server", "roomcast")))
    return reply.serialize()


def bearer_token(headers: Any, target: str) -> str | None:
    """The token of a handshake: ``Authorization: Bearer <token>``, else ``?token=``.
    ValueError for a repeated Authorization header."""
    authorization = single(headers, "Authorization") or ""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    tokens = parse_qs(split_target(target)[1]).get("token")
    return str(tokens[0]) if tokens and tokens[0] else None


def origin_allowed(origin: str | None, host: str | None, patterns: tuple[str, ...],
                   same_host_only: bool) -> bool:
    """True when a browser at ``origin`` may connect. No ``Origin`` (a non-browser client):
    allowed. ``patterns`` are globs matched case-insensitively against the whole origin
    (``https://*.example.com``). Without patterns: any origin, or with ``same_host_only``
    only one whose host name is the one the request was sent to (ports may differ: a proxy
    on 443 forwards to a node on 8000)."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    if patterns:
        return any(fnmatch.fnmatchcase(origin, p.strip().lower()) for p in patterns)
    if not same_host_only:
        return True
    asked = (host or "").strip().lower()
    try:
        asked_name = urlsplit(f"//{asked}").hostname
        return asked_name is not None and urlsplit(origin).hostname == asked_name
    except ValueError:  # A malformed host or origin ("[zz"): not the same host.
        return False


class Gatekeeper:
    """The checks of one node's upgrade requests, and the counts they need."""

    def __init__(self, config: Config, auth: Authenticator, metrics: Metrics) -> None:
        self.config = config
        self.auth = auth
        self.metrics = metrics
        #: Upgrades accepted whose TCP connection still lives, in total and per address.
        self.open = 0
        self.by_address: collections.Counter[str] = collections.Counter()
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def refuse(self, refusal: Refusal) -> Refusal:
        self.metrics.handshakes_refused.labels(reason=refusal.reason).inc()
        log.debug("handshake refused", status=refusal.status, reason=refusal.reason)
        return refusal

    def check_origin(self, headers: Any) -> Refusal | None:
        cfg = self.config
        try:
            origin, host = single(headers, "Origin"), single(headers, "Host")
        except ValueError as exc:
            return self.refuse(Refusal(400, str(exc), "bad_request"))
        if origin_allowed(origin, host, cfg.allowed_origins, same_host_only=cfg.auth == "jwt"):
            return None
        return self.refuse(Refusal(403, "this origin may not connect", "origin"))

    def check_capacity(self, address: str) -> Refusal | None:
        """Node and address limits, and the handshake rate of ``address``."""
        cfg = self.config
        if cfg.max_connections and self.open >= cfg.max_connections:
            return self.refuse(Refusal(503, "node is full; connect to another node",
                                       "node_full"))
        if (cfg.max_connections_per_address
                and self.by_address[address] >= cfg.max_connections_per_address):
            return self.refuse(Refusal(429, "too many connections from this address",
                                       "address_full", (("Retry-After", "1"),)))
        if cfg.handshake_rate > 0:
            verdict = self._bucket(address).charge()
            if not verdict.allowed:
                seconds = max(1, -(-verdict.retry_after_ms // 1000))
                return self.refuse(Refusal(429, "too many handshakes; slow down",
                                           "handshake_rate",
                                           (("Retry-After", str(seconds)),)))
        return None

    def _bucket(self, address: str) -> TokenBucket:
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket(self.config.handshake_rate,
                                                          self.config.handshake_burst)
            if len(self._buckets) > MAX_TRACKED_ADDRESSES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
        return bucket

    async def verify_request(self, headers: Any, target: str, required: bool
                             ) -> Claims | Refusal | None:
        """``verify`` of the handshake's token (a repeated Authorization header: 401)."""
        try:
            token = bearer_token(headers, target)
        except ValueError as exc:
            self.metrics.auth_failures.labels(reason="invalid").inc()
            return self.refuse(Refusal(401, str(exc), "unauthorized"))
        return await self.verify(token, required)

    async def verify(self, token: str | None, required: bool) -> Claims | Refusal | None:
        """The claims of a handshake's token; a 401/503 Refusal when it does not verify, or
        when there is none and ``required``; None for no token where none is needed."""
        if token is None:
            if not required:
                return None
            return self.refuse(Refusal(401, "a token is required", "unauthorized",
                                       (("WWW-Authenticate", 'Bearer realm="roomcast"'),)))
        try:
            return await self.auth.connection(token)
        except TokenError as exc:
            self.metrics.auth_failures.labels(reason=exc.reason).inc()
            if exc.reason == "unavailable":
                return self.refuse(Refusal(503, "cannot check tokens now; retry later",
                                           "unauthorized", (("Retry-After", "1"),)))
            description = exc.message.replace('"', "'")
            return self.refuse(Refusal(
                401, exc.message, "unauthorized",
                (("WWW-Authenticate",
                  f'Bearer realm="roomcast", error="invalid_token", '
                  f'error_description="{description}"'),)))

    def admit(self, address: str) -> None:
        """Count an accepted upgrade until ``release``."""
        self.open += 1
        self.by_address[address] += 1

    def release(self, address: str) -> None:
        self.open -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]
