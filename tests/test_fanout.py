"""Frame-level fan-out: pre-built frames are valid RFC 6455 frames, writes are coalesced, and
closing or closed connections are never written to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import CLOSED, CLOSING
from websockets.streams import StreamReader

from roomcast.config import Config
from roomcast.metrics import Metrics
from roomcast.service.connection import Identity
from roomcast.service.ratelimit import TokenBucket
from roomcast.transports.session import Session
from roomcast.transports.websocket import AdmittedConnection
from roomcast.transports.writer import FrameWriter, SendBudget, SessionFanout, text_frame


def parse(data: bytes) -> tuple[Frame, bytes]:
    """Parse one frame with websockets' own sans-I/O parser; return it and what is left."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        return done.value, reader.buffer[:]
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_length_encodings_parse_back(length: int) -> None:
    """Every payload-length encoding (7-bit, 16-bit, 64-bit) is a valid final text frame."""
    payload = b"x" * length
    frame, rest = parse(text_frame(payload))
    assert frame.opcode is Opcode.TEXT and frame.fin is True
    assert frame.data == payload and rest == b""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_coalesced_frames_parse_as_the_same_messages(payloads: list[bytes]) -> None:
    """Concatenated frames (one coalesced write) parse back to the same messages, in order."""
    data = b"".join(text_frame(p) for p in payloads)
    for payload in payloads:
        frame, data = parse(data)
        assert frame.data == payload
    assert data == b""


class Pair:
    """A real websockets server on 127.0.0.1:0 and clients connected to it."""

    def __init__(self) -> None:
        self.server_side: list[ServerConnection] = []
        self.clients: list[ClientConnection] = []
        self.joined = asyncio.Condition()

    async def handler(self, ws: ServerConnection) -> None:
        async with self.joined:
            self.server_side.append(ws)
            self.joined.notify_all()
        await ws.wait_closed()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    state = Pair()
    async with serve(state.handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        for _ in range(3):
            state.clients.append(await connect(f"ws://127.0.0.1:{port}", compression=None))
        async with state.joined:
            await asyncio.wait_for(
                state.joined.wait_for(lambda: len(state.server_side) == 3), 5)
        yield state
        for client in state.clients:
            await client.close()


async def test_writer_coalesces_and_skips_closing_and_closed(pair: Pair) -> None:
    """Three messages to an open connection arrive in order from one write; a closing and a
    closed connection get nothing written after their close."""
    # Order server-side connections like their clients (by the client's local port).
    by_port = {ws.remote_address[1]: ws for ws in pair.server_side}
    open_ws, closed_ws, closing_ws = (by_port[c.local_address[1]] for c in pair.clients)
    await closed_ws.close()
    closing_ws.protocol.send_close(1001, "bye")  # Close frame queued: CLOSING, not yet closed.
    closing_ws.send_data()
    assert closed_ws.protocol.state is CLOSED and closing_ws.protocol.state is CLOSING

    writer = FrameWriter()
    reached = [writer.send([open_ws, closed_ws, closing_ws], b'{"n":%d}' % i) for i in range(3)]
    assert reached == [1, 1, 1]
    writer.flush()
    assert (writer.writes, writer.frames) == (1, 3)

    open_client, _, closing_client = pair.clients
    got = [await asyncio.wait_for(open_client.recv(), 5) for _ in range(3)]
    assert got == ['{"n":0}', '{"n":1}', '{"n":2}']
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(closing_client.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_writer_close_after_queue_drops_pending_frames(pair: Pair) -> None:
    """Frames queued before a close started are not written after the close frame."""
    ws = pair.server_side[0]
    client = next(c for c in pair.clients if c.local_address[1] == ws.remote_address[1])
    writer = FrameWriter()
    writer.send([ws], b'{"late":true}')
    ws.protocol.send_close(1012, "service restart")
    ws.send_data()
    writer.flush()
    assert writer.writes == 0
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(client.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012


def session_of(ws: ServerConnection, writer: FrameWriter, fanout: SessionFanout | None = None,
               ) -> Session:
    """A node's Session over ``ws`` (so that SessionFanout and the close find it)."""
    budget = fanout.budget if fanout is not None else SendBudget(Metrics(), 1 << 20)
    session = Session(ws=ws, writer=writer, identity=Identity("u", "u"), codec="native",
                      limiter=TokenBucket(100, 100), budget=budget)
    ws.session = session  # type: ignore[attr-defined]  # As AdmittedConnection has it.
    return session


async def test_write_soon_joins_the_next_flush_in_order(pair: Pair) -> None:
    """Replies sent with send_soon (publish acks) wait for the next flush and share its one
    write, after the room's fan-out queued before them and before the fan-out queued after
    them; a reply sent at once after them (send) writes them first, so the client sees
    everything in the order it was sent."""
    ws = pair.server_side[0]
    client = next(c for c in pair.clients if c.local_address[1] == ws.remote_address[1])
    writer = FrameWriter()
    fanout = SessionFanout(writer, Metrics(), 1 << 20)
    session = session_of(ws, writer, fanout)
    room: dict[Any, None] = {session: None}  # A room's member group.
    fanout.send(room, b'{"fanout":1}')
    session.send_soon(b'{"ack":1}')
    fanout.send(room, b'{"fanout":2}')
    session.send_soon(b'{"ack":2}')
    assert writer.writes == 0  # Nothing written yet.
    writer.flush()
    assert writer.writes == 1  # Both frames and both acks: one write.
    session.send_soon(b'{"ack":3}')
    session.send(b'{"reply":1}')  # Writes ack 3 first.
    assert ws not in writer.pending
    got = [await asyncio.wait_for(client.recv(), 5) for _ in range(6)]
    assert got == ['{"fanout":1}', '{"ack":1}', '{"fanout":2}', '{"ack":2}', '{"ack":3}',
                   '{"reply":1}']


async def test_a_close_writes_the_waiting_acks_first() -> None:
    """An ack waiting for the next flush is written before the close frame of a close the
    node starts on the connection itself (the handler's crash path, the flood close), not
    dropped by the flush that comes after the close."""

    class Connection(AdmittedConnection):
        pass

    Connection.endpoint = SimpleNamespace(  # type: ignore[assignment]  # What it reads.
        config=Config(), metrics=Metrics(), gate=None)
    writer = FrameWriter()

    async def handler(ws: ServerConnection) -> None:
        assert isinstance(ws, Connection)
        session_of(ws, writer)
        writer.write_soon(ws, b'{"ack":1}')
        await ws.close(1011, "internal error")

    async with serve(handler, "127.0.0.1", 0, compression=None,
                     create_connection=Connection) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as client:
            assert await asyncio.wait_for(client.recv(), 5) == '{"ack":1}'
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(client.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


async def test_a_close_goes_out_even_when_writing_before_it_fails() -> None:
    """A bug in what writes the pending frames before a close (fan-out's bookkeeping) is
    logged, and the connection is still closed: not left open for good."""

    class Connection(AdmittedConnection):
        pass

    Connection.endpoint = SimpleNamespace(  # type: ignore[assignment]  # What it reads.
        config=Config(), metrics=Metrics(), gate=None)
    writer = FrameWriter()

    def broken(ws: ServerConnection) -> None:
        raise RuntimeError("a bug in settle_one")

    writer.before_write_one = broken

    async def handler(ws: ServerConnection) -> None:
        session_of(ws, writer)
        await ws.close(1011, "internal error")

    async with serve(handler, "127.0.0.1", 0, compression=None,
                     create_connection=Connection) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as client:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(client.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
