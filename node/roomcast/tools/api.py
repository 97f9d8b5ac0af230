"""A client of a node's server API (docs/API.md) for backends: ``ApiClient`` blocks (stdlib
``urllib.request``), ``AsyncApiClient`` awaits (aiohttp). Both have the API's methods, by the
API's names, and return its JSON reply as a dict::

    api = ApiClient("http://10.0.0.5:9000", key)
    api.publish("chat:lobby", {"text": "hi"})   # {"offset": 7, "epoch": "d0ba8fba"}

    async with AsyncApiClient("http://10.0.0.5:9000", key) as api:
        await api.presence("chat:lobby")         # {"members": [...], "count": 1}

Every failure raises ``ApiError``: the server's ``{"error": {"code", "message"}}`` with the HTTP
status and ``Retry-After``, or status 0 with code ``timeout`` or ``unreachable`` when no answer
came (the request may or may not have been done).

``publish(..., retries=N)`` retries a publish that was refused with 503 or 429 or got no answer,
up to N more times with backoff, under one idempotency key (made up when none is given): the
server publishes a key once per room within --idempotency-window, so a retry of a publish that
was in fact done returns the first result with ``"duplicate": true`` instead of publishing twice.
Other methods are never retried here (``disconnect`` and ``unsubscribe`` are harmless to repeat,
``broadcast`` is not: it takes no key).
"""

from __future__ import annotations

import asyncio
import http.client
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import orjson

if TYPE_CHECKING:
    import aiohttp

#: The internal port's default address (--api-host, --api-port).
DEFAULT_URL: Final = "http://127.0.0.1:9000"
#: Seconds a call may take. Longer than the node's own --api-timeout (10 s by default), so that
#: the node's 503 ("did not answer in time") arrives before this gives up.
DEFAULT_TIMEOUT: Final = 15.0
#: Statuses after which nothing was done and a retry may succeed: the cluster backend was
#: unavailable (503) or the key's rate was exceeded (429); 0 is no answer at all.
RETRY_STATUSES: Final = frozenset({0, 429, 503})
#: Backoff before retry n (0-based): FIRST_BACKOFF * 2**n, at most MAX_BACKOFF, with jitter; a
#: longer Retry-After wins.
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 5.0

R = TypeVar("R")


class ApiError(Exception):
    """A call that failed: ``status`` is the HTTP status (0: no answer, see ``code``), ``code``
    the API's error code (``bad_request``, ``unauthorized``, ``unknown_namespace``, ...; with
    status 0 ``timeout`` or ``unreachable``), ``message`` its text, ``retry_after`` the seconds
    of the Retry-After header (429 and 503), else None."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(status, code, message, retry_after)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        head = f"{self.status} {self.code}" if self.status else self.code
        return f"{head}: {self.message}"

    @property
    def retryable(self) -> bool:
        """True when nothing was done (503, 429) or it is not known (no answer)."""
        return self.status in RETRY_STATUSES


# --- the sans-I/O part: requests and replies ---------------------------------------------------


def _base_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the API address must be http://host:port, not {url!r}")
    return url.rstrip("/")


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"apikey {key}", "Content-Type": "application/json",
            "Accept": "application/json", "User-Agent": "roomcast-api-client"}


def _reply(status: int, body: bytes, retry_after: str | None) -> dict[str, Any]:
    """The result of a 200 reply; ApiError for any other status (from the API's error body, or
    from the status alone when something else, a proxy, answered)."""
    try:
        value = orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError:
        value = None
    if status == 200 and isinstance(value, dict):
        return value
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code, message = error["code"], str(error.get("message", ""))
    elif status == 200:
        code, message = "bad_reply", "the reply is not a JSON object"
    else:
        code = "http_error"
        message = " ".join(body[:200].decode(errors="replace").split()) or f"HTTP {status}"
    raise ApiError(status, code, message, _seconds(retry_after))


def _seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:  # An HTTP date: the node never sends one.
        return None


def _backoff(attempt: int, error: ApiError) -> float:
    delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** attempt) * random.uniform(0.5, 1.0)
    return max(delay, error.retry_after or 0.0)


def _idempotency_key(given: str | None, retries: int) -> str | None:
    if retries < 0:
        raise ValueError("retries must not be negative")
    return given if given is not None or retries == 0 else uuid.uuid4().hex


def _publish_params(room: str, data: Any, key: str | None) -> dict[str, Any]:
    return {"room": room, "data": data, **({"idempotency_key": key} if key is not None else {})}


class _Methods(Generic[R]):
    """The API's methods on top of ``call`` (R: a dict, or an awaitable of one). ``publish`` is
    each client's own: its retries sleep."""

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> R:
        """POST /api/<method> with ``params``; the reply's JSON, or ApiError."""
        raise NotImplementedError

    def broadcast(self, rooms: Sequence[str], data: Any) -> R:
        """Publish ``data`` to each room (at most --api-max-batch): ``{"results": [{"room",
        "offset", "epoch"} or {"room", "error"}, ...]}``, one per room, in order."""
        return self.call("broadcast", {"rooms": list(rooms), "data": data})

    def presence(self, room: str) -> R:
        """Every connection in the room, cluster-wide: ``{"members": [...], "count": users}``."""
        return self.call("presence", {"room": room})

    def presence_stats(self, room: str) -> R:
        """``{"clients": connections, "users": distinct users}`` of the room."""
        return self.call("presence_stats", {"room": room})

    def history(self, room: str, since: Mapping[str, Any] | None = None,
                limit: int | None = None, reverse: bool = False) -> R:
        """Stored messages, oldest first (newest first with ``reverse``) with the room's
        ``offset`` and ``epoch``. ``since``: a position ``{"offset", "epoch"}`` (an earlier
        reply will do): only what came after it, and ``recovered`` says whether all of it is
        still there. ``limit``: 1 to 1000 (the newest, or with ``since`` the oldest after it)."""
        params: dict[str, Any] = {"room": room}
        if since is not None:
            params["since"] = {"offset": since["offset"], "epoch": since["epoch"]}
        if limit is not None:
            params["limit"] = limit
        if reverse:
            params["reverse"] = True
        return self.call("history", params)

    def disconnect(self, user: str, code: int = 4500, reason: str = "disconnected") -> R:
        """Close every connection of ``user`` on every node with ``code`` (1000, 1008 or 4000 to
        4999; 4000-4499 the client reconnects, 4500-4999 it does not) and ``reason`` (at most
        123 bytes). ``{}``: sent to the nodes, not a count of closed connections."""
        return self.call("disconnect", {"user": user, "code": code, "reason": reason})

    def unsubscribe(self, user: str, room: str) -> R:
        """Take every connection of ``user`` out of ``room`` on every node. ``{}``."""
        return self.call("unsubscribe", {"user": user, "room": room})

    def rooms(self, pattern: str | None = None) -> R:
        """``{"rooms": {room: distinct users}}`` of the rooms someone is in, cluster-wide;
        ``pattern`` is a glob (``chat:*``)."""
        return self.call("rooms", {} if pattern is None else {"pattern": pattern})

    def info(self) -> R:
        """``{"node_id", "nodes": {node_id: {"connections", "alive"}}, "rooms": count}``."""
        return self.call("info")

    def batch(self, commands: Sequence[Mapping[str, Any]]) -> R:
        """Run ``[{"method", "params"}, ...]`` in order in one request (at most --api-max-batch):
        ``{"replies": [{"result": ...} or {"error": {"code", "message"}}, ...]}``."""
        return self.call("batch", {"commands": [dict(c) for c in commands]})


# --- blocking ----------------------------------------------------------------------------------


class ApiClient(_Methods[dict[str, Any]]):
    """The server API over blocking HTTP, one connection per call; safe to share between
    threads. ``url``: the node's internal port, ``http://host:port``. HTTP(S)_PROXY variables
    are ignored, as aiohttp does: the internal port is never reached through a proxy."""

    def __init__(self, url: str, key: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not key:
            raise ValueError("an API key is needed (--api-key of the node)")
        self.url = _base_url(url)
        self.timeout = timeout
        self._headers = _headers(key)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}/api/{method}",
                                         data=orjson.dumps(dict(params or {})),
                                         headers=self._headers, method="POST")
        try:
            status, body, retry_after = self._exchange(request)
        except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts included.
            raise _no_answer(self.url, self.timeout, exc) from exc
        return _reply(status, body, retry_after)

    def _exchange(self, request: urllib.request.Request) -> tuple[int, bytes, str | None]:
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, response.read(), response.headers.get("Retry-After")
        except urllib.error.HTTPError as exc:  # Any status but 2xx: a reply all the same.
            with exc:
                return exc.code, exc.read(), exc.headers.get("Retry-After")

    def publish(self, room: str, data: Any, idempotency_key: str | None = None, *,
                retries: int = 0) -> dict[str, Any]:
        """Publish ``data`` as the server: ``{"offset", "epoch"}``, plus ``"duplicate": true``
        when ``idempotency_key`` was already published to the room within the window (nothing
        is published again). ``retries``: see the module docstring."""
        key = _idempotency_key(idempotency_key, retries)
        return _retrying(lambda: self.call("publish", _publish_params(room, data, key)),
                         retries, time.sleep)


def _retrying(attempt: Callable[[], dict[str, Any]], retries: int,
              sleep: Callable[[float], None]) -> dict[str, Any]:
    for n in range(retries + 1):
        try:
            return attempt()
        except ApiError as exc:
            if not exc.retryable or n == retries:
                raise
            sleep(_backoff(n, exc))
    raise AssertionError("unreachable")


def _no_answer(url: str, timeout: float, exc: BaseException) -> ApiError:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return ApiError(0, "timeout", f"no answer from {url} within {timeout:g} s")
    text = " ".join(str(reason).split()) or type(reason).__name__
    return ApiError(0, "unreachable", f"{url}: {text}")


# --- asyncio -----------------------------------------------------------------------------------


class AsyncApiClient(_Methods[Awaitable[dict[str, Any]]]):
    """The server API on aiohttp, over a pool of kept-alive connections. Use ``async with``, or
    call ``close()``; a ``session`` passed in is the caller's to close."""

    def __init__(self, url: str, key: str, *, timeout: float = DEFAULT_TIMEOUT,
                 session: aiohttp.ClientSession | None = None) -> None:
        if not key:
            raise ValueError("an API key is needed (--api-key of the node)")
        self.url = _base_url(url)
        self.timeout = timeout
        self._headers = _headers(key)
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> AsyncApiClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool (if this client made it). Idempotent."""
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    async def call(self, method: str, params: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
        import aiohttp  # Here, so that importing this module for ApiClient needs no aiohttp.

        if self._session is None:
            if not self._owns_session:
                raise RuntimeError("the client is closed")
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                f"{self.url}/api/{method}", data=orjson.dumps(dict(params or {})),
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                body = await response.read()
        except TimeoutError as exc:
            raise ApiError(0, "timeout", f"no answer from {self.url} within {self.timeout:g} s"
                           ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _no_answer(self.url, self.timeout, exc) from exc
        return _reply(response.status, body, response.headers.get("Retry-After"))

    async def publish(self, room: str, data: Any, idempotency_key: str | None = None, *,
                      retries: int = 0) -> dict[str, Any]:
        """As ``ApiClient.publish``."""
        key = _idempotency_key(idempotency_key, retries)
        for n in range(retries + 1):
            try:
                return await self.call("publish", _publish_params(room, data, key))
            except ApiError as exc:
                if not exc.retryable or n == retries:
                    raise
                await asyncio.sleep(_backoff(n, exc))
        raise AssertionError("unreachable")
