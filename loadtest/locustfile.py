"""Locust scenarios for roomcast's native protocol (docs/PROTOCOL.md), over websocket-client.

Locust monkey-patches the standard library with gevent before it imports this file, so
websocket-client's blocking sockets yield to other users. Each user owns one connection and one
receive greenlet. Every connect, join, leave, publish and ping is reported as a Locust request of
type ``WS``; every message whose ``data`` carries the publisher's ``sent_ns`` is reported as type
``FANOUT`` with its fan-out latency (receive time minus ``sent_ns``, one clock: run Locust on the
publishers' host). Unexpected closes are failures of type ``WS`` named ``closed``.

Scenarios (pick user classes by name on the command line, or tasks with ``--tags``):

- ``BigRoomSubscriber`` + ``BigRoomPublisher`` (tag ``bigroom``): everyone in one room, one
  publisher (``fixed_count = 1``) at ``--publish-rate`` messages/s.
- ``SmallRooms`` (tag ``smallrooms``): rooms of ``--room-size`` users, each publishing now and then.
- ``ChatUser`` (tag ``chat``): ten rooms; everyone sends typing events and a message now and then.
- ``Churn`` (tag ``churn``): connect, join, leave, disconnect, in a loop.
- ``ReconnectStorm`` (tag ``reconnect``): on a 1012/1006/1001/1013 close, reconnect with capped
  exponential backoff and jitter, rejoin with ``since`` and check the gap was recovered. Run it
  while draining a node or rolling a cluster.

    locust -f loadtest/locustfile.py --headless -u 200 -r 50 -t 30s \\
        --host ws://127.0.0.1:8000 --csv results/locust --html results/locust.html \\
        BigRoomSubscriber BigRoomPublisher

The host is a ws:// or wss:// base URL: a lone node, or nginx in front of a cluster; ``/ws`` is
appended unless the URL already has a path.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import time
from typing import Any
from urllib.parse import urlsplit

import gevent
import websocket
from gevent.event import AsyncResult
from locust import User, between, constant, events, tag, task
from locust.env import Environment

REQUEST_TIMEOUT = 10.0  # Seconds to wait for a reply (joined, published, pong...).
RECONNECT_CODES = frozenset({1001, 1006, 1011, 1012, 1013})  # node/closecodes.py RECONNECT
BACKOFF_BASE, BACKOFF_CAP = 0.2, 5.0

_user_numbers = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("roomcast")
    group.add_argument("--big-room", default="big", help="room of the BigRoom scenario")
    group.add_argument("--publish-rate", type=float, default=10.0,
                       help="messages/s of each BigRoomPublisher (the node's default rate "
                       "limit is 20/s per connection)")
    group.add_argument("--room-size", type=int, default=5,
                       help="users per room in the SmallRooms scenario")
    group.add_argument("--payload-bytes", type=int, default=64,
                       help="bytes of filler text in each published message")


@events.test_start.add_listener
def _drop_users_without_tasks(environment: Environment, **_kwargs: Any) -> None:
    """With --tags, run only the scenarios that kept a task (Locust would fail the others).

    test_start fires after Locust filtered the tasks by tag and before it dispatches users.
    """
    environment.user_classes[:] = [u for u in environment.user_classes if u.tasks]


def ws_url(host: str, user_id: str) -> str:
    """The native endpoint under ``host`` (ws:// or wss://), with this user's identity."""
    parts = urlsplit(host)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"--host must be a ws:// or wss:// URL, not {host!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return f"{parts.scheme}://{parts.netloc}{path}?user_id={user_id}&username={user_id}"


class RoomcastSocket:
    """One native-protocol connection that reports everything it does to Locust."""

    def __init__(self, env: Environment, url: str, fanout_name: str) -> None:
        self.env = env
        self.url = url
        self.fanout_name = fanout_name
        self.ws: websocket.WebSocket | None = None
        self.close_code: int | None = None
        self.closing = False
        self.on_close: Any = None  # Called with the close code when the server ends it.
        #: room -> (offset, epoch) of the last message seen, for a resume with ``since``.
        self.positions: dict[str, tuple[int, str]] = {}
        self.retry_after_ms = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, AsyncResult] = {}
        self._reader: gevent.Greenlet | None = None

    def fire(self, name: str, started: float, length: int = 0,
             exception: Exception | None = None, kind: str = "WS") -> None:
        self.env.events.request.fire(
            request_type=kind, name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={},
        )

    # --- calls ---------------------------------------------------------------------------------

    def connect(self) -> bool:
        """Open the connection and read the welcome; reported as ``connect``."""
        started = time.perf_counter()
        self.closing, self.close_code = False, None
        try:
            self.ws = websocket.create_connection(self.url, timeout=REQUEST_TIMEOUT)
            welcome = json.loads(self.ws.recv())
            if welcome.get("type") != "welcome":
                raise ConnectionError(f"expected a welcome, got {welcome.get('type')!r}")
            self.ws.settimeout(None)  # Idle rooms are normal; the server pings every 20 s.
        except Exception as exc:
            self.fire("connect", started, exception=exc)
            self.ws = None
            return False
        self.fire("connect", started)
        self._reader = gevent.spawn(self._receive)
        return True

    def request(self, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Send ``body`` with a fresh id and wait for the reply with that id."""
        started = time.perf_counter()
        rid = next(self._ids)
        waiter = self._pending[rid] = AsyncResult()
        try:
            if self.ws is None:
                raise ConnectionError("not connected")
            frame = json.dumps({**body, "id": rid})
            self.ws.send(frame)
            reply: dict[str, Any] = waiter.get(timeout=REQUEST_TIMEOUT)
            if reply.get("type") == "error":
                raise RuntimeError(f"{reply.get('code')}: {reply.get('message')}")
        except Exception as exc:
            self.fire(name, started, exception=exc)
            return None
        finally:
            self._pending.pop(rid, None)
        self.fire(name, started, len(frame))
        return reply

    def join(self, room: str, since: tuple[int, str] | None = None) -> dict[str, Any] | None:
        body: dict[str, Any] = {"type": "join", "room": room}
        if since is not None:
            body["since"] = {"offset": since[0], "epoch": since[1]}
        reply = self.request("join", body)
        if reply is not None and "offset" in reply and (
            since is None or reply.get("recovered") is False
        ):  # A fresh start (or a gap for good): continue from the room's current position.
            self.positions[room] = (reply["offset"], reply["epoch"])
        return reply

    def publish(self, room: str, seq: int, filler: int) -> None:
        self.request("publish", {"type": "publish", "room": room, "data": {
            "seq": seq, "sent_ns": time.time_ns(), "text": "x" * filler}})

    def send(self, name: str, body: dict[str, Any]) -> None:
        """A request without a reply (typing): reported with the time to hand it to the socket."""
        started = time.perf_counter()
        try:
            if self.ws is None:
                raise ConnectionError("not connected")
            self.ws.send(json.dumps(body))
        except Exception as exc:
            self.fire(name, started, exception=exc)
            return
        self.fire(name, started)

    def close(self) -> None:
        """Leave on our own: close 1000 and stop the reader; not reported as a failure."""
        self.closing = True
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(Exception):  # Already gone: nothing to tell the server.
                ws.send_close(1000)
        if self._reader is not None:
            self._reader.join(timeout=1.0)
            self._reader.kill(block=False)
        if ws is not None:
            ws.shutdown()

    # --- the receive greenlet ------------------------------------------------------------------

    def _receive(self) -> None:
        ws = self.ws
        code = 1006
        try:
            while ws is not None:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    break
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self._dispatch(data, time.time_ns())
        except (websocket.WebSocketException, OSError):
            pass  # The connection died: 1006.
        self.close_code = code
        if self.ws is ws:
            self.ws = None
        for waiter in self._pending.values():
            waiter.set_exception(ConnectionError(f"closed {code}"))
        if self.closing:
            return
        if self.on_close is not None:
            self.on_close(code)
        else:
            self.fire("closed", time.perf_counter(),
                      exception=ConnectionError(f"server closed the connection: {code}"))

    def _dispatch(self, raw: bytes, now_ns: int) -> None:
        message = json.loads(raw)
        kind = message.get("type")
        if kind == "message":
            room = message.get("room")
            if "offset" in message and room is not None:
                self.positions[room] = (message["offset"], message["epoch"])
            data = message.get("data")
            if isinstance(data, dict) and isinstance(data.get("sent_ns"), int):
                self.env.events.request.fire(
                    request_type="FANOUT", name=self.fanout_name,
                    response_time=(now_ns - data["sent_ns"]) / 1e6,
                    response_length=len(raw), exception=None, context={},
                )
        elif kind == "reconnect":
            self.retry_after_ms = int(message.get("retry_after_ms") or 0)
            for room, pos in (message.get("rooms") or {}).items():
                if isinstance(pos, dict) and "offset" in pos:
                    self.positions[room] = (pos["offset"], pos["epoch"])
        waiter = self._pending.get(message.get("id"))
        if waiter is not None:
            waiter.set(message)


class RoomcastUser(User):
    """A user with one connection; subclasses say which room and what to do."""

    abstract = True
    fanout_name = "room"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.number = next(_user_numbers)
        self.user_id = f"locust-{self.number}-{random.randrange(1 << 30):x}"
        self.options = environment.parsed_options
        self.sock = RoomcastSocket(environment, ws_url(self.host or "", self.user_id),
                                   self.fanout_name)
        self.seq = itertools.count()

    def on_start(self) -> None:
        if self.sock.connect():
            room = self.room()
            if room:
                self.sock.join(room)

    def on_stop(self) -> None:
        self.sock.close()

    def room(self) -> str | None:
        return None

    def ensure_connected(self) -> bool:
        """After the server closed us (reported once as ``closed``), connect and join again."""
        if self.sock.ws is None and not self.sock.closing:
            self.on_start()
        return self.sock.ws is not None

    def filler(self) -> int:
        return int(getattr(self.options, "payload_bytes", 64))


class BigRoomSubscriber(RoomcastUser):
    """Joins the big room and listens; pings now and then."""

    weight = 10
    fanout_name = "big-room"
    wait_time = constant(5)

    def room(self) -> str | None:
        return str(getattr(self.options, "big_room", "big"))

    @tag("bigroom")
    @task
    def ping(self) -> None:
        if self.ensure_connected():
            self.sock.request("ping", {"type": "ping"})


class BigRoomPublisher(RoomcastUser):
    """The big room's only publisher, at --publish-rate messages/s (not joined itself)."""

    fixed_count = 1
    fanout_name = "big-room"

    def wait_time(self) -> float:
        return 1.0 / float(getattr(self.options, "publish_rate", 10.0))

    @tag("bigroom")
    @task
    def publish(self) -> None:
        room = str(getattr(self.options, "big_room", "big"))
        if self.ensure_connected():
            self.sock.publish(room, next(self.seq), self.filler())


class SmallRooms(RoomcastUser):
    """Rooms of --room-size users; each user publishes every one to three seconds."""

    weight = 5
    fanout_name = "small-rooms"
    wait_time = between(1, 3)

    def room(self) -> str | None:
        size = max(1, int(getattr(self.options, "room_size", 5)))
        return f"small-{self.number // size}"

    @tag("smallrooms")
    @task
    def publish(self) -> None:
        if self.ensure_connected():
            self.sock.publish(self.room() or "small-0", next(self.seq), self.filler())


class ChatUser(RoomcastUser):
    """Ten chat rooms: type for a moment, then send a short message."""

    weight = 5
    fanout_name = "chat"
    wait_time = between(2, 6)

    def room(self) -> str | None:
        return f"chat-{self.number % 10}"

    @tag("chat")
    @task
    def chat(self) -> None:
        room = self.room() or "chat-0"
        if not self.ensure_connected():
            return
        self.sock.send("typing", {"type": "typing", "room": room})
        gevent.sleep(random.uniform(0.3, 1.5))
        self.sock.publish(room, next(self.seq), random.randint(8, self.filler()))


class Churn(RoomcastUser):
    """Connect, join, leave, disconnect, again and again."""

    weight = 2
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        pass  # Each task makes its own connection.

    @tag("churn")
    @task
    def cycle(self) -> None:
        room = f"churn-{self.number % 20}"
        if not self.sock.connect():
            return
        if self.sock.join(room) is not None:
            self.sock.request("leave", {"type": "leave", "room": room})
        started = time.perf_counter()
        self.sock.close()
        self.sock.fire("disconnect", started)


class ReconnectStorm(RoomcastUser):
    """Stays in a room; when the server closes it with a reconnect code, resumes with ``since``.

    Reports ``reconnect`` (close to rejoined, backoff included) and ``resume`` (a failure when
    the join says recovered: false, i.e. messages were missed for good).
    """

    weight = 5
    fanout_name = "storm"
    wait_time = between(1, 3)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.sock.on_close = self._closed

    def room(self) -> str | None:
        return f"storm-{self.number % 10}"

    @tag("reconnect")
    @task
    def publish(self) -> None:
        if self.sock.ws is not None:
            self.sock.publish(self.room() or "storm-0", next(self.seq), self.filler())

    def _closed(self, code: int) -> None:
        if code not in RECONNECT_CODES:
            self.sock.fire("closed", time.perf_counter(),
                           exception=ConnectionError(f"closed {code}: not a reconnect code"))
            return
        gevent.spawn(self._reconnect, code)

    def _reconnect(self, code: int) -> None:
        started = time.perf_counter()
        room = self.room() or "storm-0"
        for attempt in range(12):
            hint = self.sock.retry_after_ms / 1000 if code == 1012 else 0.0
            delay = max(hint, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))
            gevent.sleep(random.uniform(0.5, 1.0) * delay)  # Jitter spreads the storm.
            if self.sock.closing:
                return
            if not self.sock.connect():
                continue
            reply = self.sock.join(room, self.sock.positions.get(room))
            if reply is None:
                continue
            self.sock.fire("reconnect", started)
            recovered = reply.get("recovered", True)
            self.sock.fire("resume", time.perf_counter(), exception=None if recovered else
                           RuntimeError("recovered: false (messages missed for good)"))
            return
        self.sock.fire("reconnect", started, exception=ConnectionError("gave up after 12 tries"))
