"""Which publishes of a pipeline share one call of publish.lua (broker_redis._PublishQueue.merged),
and the command each call sends: checked on the batch itself, without Redis (the integration
tests in tests/test_merged_publishes.py run them on a real one)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from roomcast.backends import broker_redis
from roomcast.backends.broker_redis import MERGE_BYTES, _Publish, _PublishQueue
from roomcast.backends.keys import Keys
from roomcast.backends.redis_batch import Queued, _pack
from roomcast.backends.redis_common import RedisHealth, load_script

KEYS = Keys()
SCRIPT = aioredis.Redis().register_script(load_script("publish"))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def item(loop: asyncio.AbstractEventLoop, room: str, size: int = 10, key: str | None = None,
         wired: bool = True) -> _Publish:
    """A publish of ``size`` envelope bytes to ``room``, as RedisBroker.publish queues it."""
    keys = [KEYS.meta(room), KEYS.stream(room)]
    common: list[bytes | str | int] = [KEYS.channel(room), 100, 0, "e0", "PUBLISH", 0]
    if key is not None:
        keys.append(KEYS.idempotency(room, key))
        common[-1] = 60_000
    message = (b"x" * size, "c-1", 1_700_000_000_000_000)
    command = ("EVALSHA", SCRIPT.sha, len(keys), *keys, *common, 1, *message)
    tail = broker_redis.pack_args(message) if wired else b""
    return _Publish(command, SCRIPT, keys[0], loop.create_future(), keys, common, message, tail)


def event(loop: asyncio.AbstractEventLoop, room: str) -> Queued:
    return Queued(("PUBLISH", KEYS.channel(room), b"0 - 1 c-1\n{}"), None, None,
                  loop.create_future())


def queue(wired: bool = True) -> _PublishQueue:
    """A publish queue on one Redis (its own wire) or on a Redis Cluster (redis-py's pipeline;
    the client is never connected here)."""
    client = aioredis.Redis() if wired else aioredis.RedisCluster(host="127.0.0.1",
                                                                  port=1)
    return _PublishQueue(client, not wired, RedisHealth())


def spans(batch: list[Queued], wired: bool = True) -> list[int]:
    return queue(wired).merged(batch)[1]


def test_consecutive_publishes_of_a_room_are_one_call(loop: asyncio.AbstractEventLoop) -> None:
    batch: list[Queued] = [item(loop, "a") for _ in range(3)]
    [call], counts = queue().merged(batch)
    assert counts == [3]
    publishes = [p for p in batch if isinstance(p, _Publish)]
    # publish.lua's ARGV: the common ones, the count, then each message's three, in order.
    assert call.command == ("EVALSHA", SCRIPT.sha, 2, *publishes[0].keys, *publishes[0].common,
                            3, *(arg for p in publishes for arg in p.message))
    assert call.packed == _pack(call.command)  # The RESP of exactly that command.


def test_runs_break_at_another_room_and_at_an_event(loop: asyncio.AbstractEventLoop) -> None:
    a, b = "a", "b"
    batch = [item(loop, a), item(loop, a), item(loop, b), item(loop, b), item(loop, a),
             event(loop, a), item(loop, a)]
    sent, counts = queue().merged(batch)
    assert counts == [2, 2, 1, 1, 1]
    assert sent[3] is batch[5]  # The event itself, in its place.


def test_an_idempotent_publish_runs_alone(loop: asyncio.AbstractEventLoop) -> None:
    """Its key is checked and recorded for it alone: never merged with the publishes around
    it, whether a run precedes it or it would start one."""
    batch: list[Queued] = [item(loop, "a"), item(loop, "a"), item(loop, "a", key="k"),
                           item(loop, "a"), item(loop, "a")]
    sent, counts = queue().merged(batch)
    assert counts == [2, 1, 2]
    assert sent[1] is batch[2]
    assert sent[1].packed == _pack(sent[1].command)
    assert spans([item(loop, "a", key="k"), item(loop, "a", key="j")]) == [1, 1]


def test_a_run_holds_merge_bytes_of_envelopes_at_most(loop: asyncio.AbstractEventLoop) -> None:
    half = MERGE_BYTES // 2
    assert spans([item(loop, "a", half), item(loop, "a", half)]) == [2]  # Exactly the bound.
    assert spans([item(loop, "a", half), item(loop, "a", half + 1)]) == [1, 1]
    assert spans([item(loop, "a", half), item(loop, "a", half), item(loop, "a", 1)]) == [2, 1]
    # A message over the bound still goes, alone.
    assert spans([item(loop, "a"), item(loop, "a", MERGE_BYTES + 1), item(loop, "a")]) == [
        1, 1, 1]


def test_a_lone_publish_is_sent_as_it_was_queued(loop: asyncio.AbstractEventLoop) -> None:
    alone = item(loop, "a")
    [call], counts = queue().merged([alone])
    assert call is alone and counts == [1]
    assert call.packed == _pack(alone.command)


def test_on_a_redis_cluster_the_merged_command_goes_through_redis_py(
        loop: asyncio.AbstractEventLoop) -> None:
    """No wire of its own: nothing packed; redis-py's cluster pipeline routes the command by its
    keys, which are the room's."""
    batch: list[Queued] = [item(loop, "a", wired=False) for _ in range(2)]
    [call], counts = queue(wired=False).merged(batch)
    assert counts == [2] and call.packed == b""
    assert call.command[3:5] == (KEYS.meta("a"), KEYS.stream("a"))
