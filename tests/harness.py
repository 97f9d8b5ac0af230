"""Real processes on loopback for the tests: redis-server, roomcast nodes, WebSocket clients.

Every process gets an ephemeral port, is stopped by PID, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from roomcast.tools.procs import find_binary, free_port

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0,
    interval: float = 0.05, what: str = "condition",
) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class RedisServer:
    """A real redis-server on an ephemeral loopback port, without persistence."""

    def __init__(self) -> None:
        binary = find_binary("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (./dev test installs it)")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise TimeoutError("redis-server did not answer PING")

    def kill(self) -> None:
        """SIGKILL by PID: Redis vanishes with its data, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A started redis-server for a fixture, stopped by PID afterwards; a clear failure when
    redis-server is missing (the README test command installs it)."""
    if find_binary("redis-server") is None:
        import pytest

        pytest.fail("redis-server is not installed: run the README test command (./dev test)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class NodeProcess:
    """A real ``python -m roomcast node`` process; its JSON log lines are collected as they come.

    ``faults`` (names from tests/faults.py) start it through ``python -m tests.faults`` instead,
    which wraps the product functions those faults are about before the node starts.
    """

    def __init__(
        self, redis_url: str | None = None, *args: str, env: dict[str, str] | None = None,
        node_id: str | None = None, faults: Sequence[str] = (),
    ) -> None:
        self.args = list(args)
        self.redis_url = redis_url
        self.env = env or {}
        self.node_id = node_id
        self.faults = list(faults)
        self.port = 0
        self.api_port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[dict[str, Any]] = []
        self._reader: threading.Thread | None = None
        self._started = threading.Event()

    def command(self) -> list[str]:
        launcher = ["tests.faults", *self.faults, "--"] if self.faults else ["roomcast", "node"]
        cmd = [sys.executable, "-m", *launcher, "--host", "127.0.0.1", "--port", "0",
               "--api-port", "0", "--log-format", "json", "--log-level", "info", *self.args]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        if self.node_id:
            cmd += ["--node-id", self.node_id]
        return cmd

    def start(self, timeout: float = 15.0) -> NodeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.lines = []
        self._started.clear()
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._started.wait(0.05):
            if self.proc.poll() is not None:  # A bad flag: it said so and exited.
                self._reader.join(timeout=5)
                raise RuntimeError(f"node exited with {self.proc.returncode}: "
                                   f"{self.output()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"node did not start: {self.output()[-2000:]}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = {"event": "raw", "text": raw.rstrip()}
            self.lines.append(line)
            if line.get("event") == "node started":
                self.port = int(line["port"])
                self.api_port = int(line["api_port"])
                self.node_id = line.get("node_id", self.node_id)
                self._started.set()

    def output(self) -> str:
        return "\n".join(json.dumps(line) for line in self.lines)

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == event]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        """The internal port: server API, /livez, /readyz, /metrics, /admin/drain."""
        return f"http://127.0.0.1:{self.api_port}"

    def ws(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Client:
    """A WebSocket client that reads JSON envelopes with bounded waits."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []
        # Envelopes read past by request() while looking for its reply; recv() returns them first.
        self._backlog: collections.deque[dict[str, Any]] = collections.deque()

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Client:
        ws = await asyncio.wait_for(connect(url, compression=None, **kwargs), 10)
        return cls(ws)

    async def send(self, obj: Any) -> None:
        await self.ws.send(obj if isinstance(obj, str | bytes) else json.dumps(obj))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        if self._backlog:
            return self._backlog.popleft()
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        message: dict[str, Any] = json.loads(raw)
        self.seen.append(message)
        return message

    async def expect(self, kind: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """The next envelope of ``type`` kind (and the given field values), skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind} {fields} within {timeout}s; saw {self.seen[-5:]}")
            message = await self.recv(left)
            if message.get("type") == kind and all(message.get(k) == v for k, v in fields.items()):
                return message

    async def expect_any(self, kinds: Sequence[str], timeout: float = 5.0) -> dict[str, Any]:
        """The next envelope whose ``type`` is one of ``kinds``, skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"none of {kinds} within {timeout}s; saw {self.seen[-5:]}")
            message = await self.recv(left)
            if message.get("type") in kinds:
                return message

    async def request(self, obj: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send a request with an id and return the reply (or error) carrying that id."""
        await self.send(obj)
        deadline = time.monotonic() + timeout
        skipped: list[dict[str, Any]] = []
        try:
            while True:
                left = max(0.01, deadline - time.monotonic())
                raw = await asyncio.wait_for(self.ws.recv(), left)
                message: dict[str, Any] = json.loads(raw)
                self.seen.append(message)
                if message.get("id") == obj.get("id"):
                    return message
                skipped.append(message)
        finally:
            self._backlog.extend(skipped)

    async def until_closed(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every envelope still to be read, up to the server's close (the barrier: nothing can
        follow a close frame); fails if the connection is not closed within ``timeout``."""
        messages = list(self._backlog)
        self._backlog.clear()
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(timeout):
                async for raw in self.ws:
                    message: dict[str, Any] = json.loads(raw)
                    self.seen.append(message)
                    messages.append(message)
        return messages

    async def closed(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; return its close code."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drain(), timeout)
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.ws.close_code

    async def _drain(self) -> None:
        async for _ in self.ws:
            pass

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)


async def barrier(publisher: Client, room: str, *watchers: Client) -> dict[str, Any]:
    """Publish a unique marker into ``room`` from ``publisher``; assert that the next message
    each watcher receives is that marker, and return the marker's ``published`` ack.

    The node delivers one publisher's messages to a room in the order they were published, so
    whatever the publisher sent before the marker that was going to reach a watcher reaches it
    before the marker: the marker proves that nothing more arrived, without waiting a fixed time.
    """
    marker = {"barrier": uuid.uuid4().hex}
    ack = await publisher.request(
        {"type": "publish", "room": room, "data": marker, "id": marker["barrier"]})
    assert ack["type"] == "published", ack
    for watcher in watchers:
        message = await watcher.expect("message")
        assert message["data"] == marker, f"arrived before the barrier marker: {message}"
        assert message["offset"] == ack["offset"], message
    return ack


async def native(node: NodeProcess, user_id: str, username: str | None = None) -> Client:
    """A native client that has read its welcome."""
    client = await Client.open(node.ws(f"/ws?user_id={user_id}&username={username or user_id}"))
    await client.expect("welcome")
    return client
