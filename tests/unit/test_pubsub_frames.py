"""The pub/sub message format between nodes (broker_redis.parse_message, lua/publish.lua): one
frame per message, or a batch of consecutive publications of one room. A batch either parses
whole, in order, or is refused whole (ValueError) before any of it is delivered."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.backends.broker import Publication
from roomcast.backends.broker_redis import event_frame, parse_message
from roomcast.backends.keys import Keys

KEYS = Keys()
CHANNEL = KEYS.channel("r").encode()


def frame(offset: int, origin: str, payload: bytes, epoch: str = "e1", ts: int = 7) -> bytes:
    """A stored message's frame as publish.lua builds it."""
    return b"%d %s %d %s\n" % (offset, epoch.encode(), ts, origin.encode()) + payload


def batch(frames: list[bytes]) -> bytes:
    """Several frames in one pub/sub message, as publish.lua joins them."""
    return b"*%d\n" % len(frames) + b"".join(b"%d\n" % len(f) + f for f in frames)


def parse(data: bytes) -> list[Publication]:
    return parse_message(CHANNEL, data, KEYS.room_of_channel)


def test_a_single_frame_is_one_publication() -> None:
    assert parse(frame(3, "c-1", b'{"a":1}')) == [
        Publication("r", b'{"a":1}', 3, "e1", "c-1", 7)]


def test_an_event_frame_is_one_publication_without_offset_or_epoch() -> None:
    [event] = parse(event_frame(b'{"type":"typing"}', "c-2"))
    assert (event.room, event.payload, event.offset, event.epoch, event.origin) == (
        "r", b'{"type":"typing"}', 0, "", "c-2")


# Payloads with the bytes that could confuse a parser: newlines, '*', digits, spaces.
payloads = st.binary(min_size=0, max_size=40) | st.sampled_from(
    [b"\n", b"*2\n", b"12\n{}", b" ", b"\n\n*3\n1\nx"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(payloads, st.sampled_from(["c-1", "c-22", "c-333"])),
                min_size=2, max_size=12))
def test_a_batch_gives_its_publications_in_order(messages: list[tuple[bytes, str]]) -> None:
    frames = [frame(10 + i, origin, payload, ts=100 + i)
              for i, (payload, origin) in enumerate(messages)]
    got = parse(batch(frames))
    assert [(p.offset, p.payload, p.origin, p.ts_us, p.epoch, p.room) for p in got] == [
        (10 + i, payload, origin, 100 + i, "e1", "r") for i, (payload, origin) in
        enumerate(messages)]


def test_a_partition_batch_names_the_room_in_each_frame() -> None:
    """With --redis-cluster a partition's channel carries several rooms: each frame's header
    ends with its room, as publish.lua writes the origin there."""
    channel = Keys(partitions=8).partition_channel(3).encode()
    got = parse_message(channel, batch([frame(1, "c-1 a room", b"{}"),
                                        frame(2, "c-1 a room", b"[]")]))
    assert [(p.room, p.origin, p.offset) for p in got] == [
        ("a room", "c-1", 1), ("a room", "c-1", 2)]


GOOD = batch([frame(1, "c-1", b'{"a":1}'), frame(2, "c-1", b'{"b":2}')])
assert b"\n18\n" in GOOD  # The first frame's length, which two cases below damage.


@pytest.mark.parametrize("data", [
    b"*",  # No count.
    b"*\n",
    b"*x\n1\na",  # A count that is no number.
    b"* 2\n" + GOOD[3:],  # Not digits only (int() would take the space).
    b"*+2\n" + GOOD[3:],
    b"*1\n" + GOOD[3:],  # One frame is sent as itself, never as a batch of one.
    b"*0\n",
    b"*3\n" + GOOD[3:],  # Fewer frames than counted.
    GOOD[:-1],  # The last frame cut short.
    GOOD + b"x",  # Bytes after the last frame.
    GOOD.replace(b"\n18\n", b"\n-18\n", 1),  # A length that is no number of bytes.
    GOOD.replace(b"\n18\n", b"\n 18\n", 1),
    batch([frame(1, "c-1", b"{}"), b"not a frame"]),  # A good frame, then junk: neither.
], ids=lambda data: repr(data[:16]))
def test_a_malformed_batch_is_refused_whole(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse(data)


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=len(GOOD) - 1), st.binary(max_size=3))
def test_a_damaged_batch_is_refused_or_parsed_never_crashes(at: int, junk: bytes) -> None:
    """Any bytes replaced at any place: a ValueError (UnicodeDecodeError is one), or frames
    that parse; never another exception."""
    data = GOOD[:at] + junk + GOOD[at + len(junk):]
    with contextlib.suppress(ValueError):
        for publication in parse(data):
            assert publication.payload in data
