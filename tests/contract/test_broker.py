"""The Broker contract, asserted once for MemoryBroker and RedisBroker.

"Not delivered" is proven with a barrier: after the publication that must not arrive, a marker
is published to a subscribed room, and the marker must be the next thing delivered.

The memory broker's idempotency windows run on the real monotonic clock (the factories' fake
clock drives history only), so the one test that waits a window out waits on the real clock,
bounded by the window.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from roomcast import clock
from roomcast.backends.broker import BrokerUnavailable, Publication
from tests.contract.factories import WAIT, Backend, Pair, assert_next_is, fields, prefix


async def test_broker_is_unavailable_until_started_and_after_close(backend: Backend) -> None:
    """publish and publish_event raise BrokerUnavailable before start and after close;
    available follows; close is idempotent."""
    pair = await backend.pair(start=False)
    broker = pair.broker
    assert broker.available is False
    assert await broker.wait_connected(0.05) is False
    with pytest.raises(BrokerUnavailable):
        await broker.publish("r", prefix("r", 1), "c1")
    await pair.start()
    assert broker.available is True
    assert (await broker.publish("r", prefix("r", 1), "c1")).offset == 1
    await broker.close()
    await broker.close()
    assert broker.available is False
    with pytest.raises(BrokerUnavailable):
        await broker.publish("r", prefix("r", 2), "c1")
    with pytest.raises(BrokerUnavailable):
        await broker.publish_event("r", b"{}")


async def test_offsets_count_from_1_without_gaps_and_the_epoch_is_stable(
    backend: Backend,
) -> None:
    """Each message of a room gets the next offset from 1, all in one epoch, and the envelope
    carries its data, offset and epoch."""
    pair = await backend.pair()
    publications = [await pair.publish("r", n) for n in range(5)]
    assert [p.offset for p in publications] == [1, 2, 3, 4, 5]
    assert len({p.epoch for p in publications}) == 1
    assert publications[0].epoch
    for n, publication in enumerate(publications):
        body = orjson.loads(publication.payload)
        assert (body["data"], body["offset"], body["epoch"]) == (
            n, publication.offset, publication.epoch
        )
        assert (publication.room, publication.origin) == ("r", "c1")


async def test_a_subscribed_room_gets_each_publication_once_in_offset_order(
    backend: Backend,
) -> None:
    """After subscribe, on_publication sees every publication of the room exactly once, in
    order, with offsets 1..n."""
    pair = await backend.pair()
    await pair.broker.subscribe("r")
    published = [await pair.publish("r", n) for n in range(5)]
    delivered = [await pair.deliveries.next() for _ in published]
    assert [p.offset for p in delivered] == [1, 2, 3, 4, 5]
    assert [fields(p) for p in delivered] == [fields(p) for p in published]
    await assert_next_is(pair.deliveries, await pair.publish("r", "marker"))


async def test_concurrent_publishes_are_delivered_in_offset_order(backend: Backend) -> None:
    """Publishes racing each other get distinct offsets and are delivered in offset order."""
    pair = await backend.pair(history_size=50)
    await pair.broker.subscribe("r")
    published = await asyncio.gather(*(pair.publish("r", n) for n in range(20)))
    assert sorted(p.offset for p in published) == list(range(1, 21))
    delivered = [await pair.deliveries.next() for _ in published]
    assert [p.offset for p in delivered] == list(range(1, 21))
    by_offset = {p.offset: fields(p) for p in published}
    assert [fields(p) for p in delivered] == [by_offset[p.offset] for p in delivered]


async def test_rooms_that_are_not_subscribed_are_not_delivered(backend: Backend) -> None:
    """Messages and events of a room the node did not subscribe never reach on_publication."""
    pair = await backend.pair()
    await pair.broker.subscribe("live")
    await pair.publish("quiet", "x")
    await pair.broker.publish_event("quiet", b'{"type":"typing"}', "c2")
    await assert_next_is(pair.deliveries, await pair.publish("live", "marker"))


async def test_unsubscribe_stops_delivery(backend: Backend) -> None:
    """After unsubscribe, the room's messages and events are no longer delivered."""
    pair = await backend.pair()
    await pair.broker.subscribe("gone")
    await pair.broker.subscribe("live")
    await assert_next_is(pair.deliveries, await pair.publish("gone", "before"))
    await pair.broker.unsubscribe("gone")
    await pair.publish("gone", "after")
    await pair.broker.publish_event("gone", b'{"type":"typing"}', "c2")
    await assert_next_is(pair.deliveries, await pair.publish("live", "marker"))


async def test_publish_returns_the_same_bytes_that_are_delivered(backend: Backend) -> None:
    """The publisher's acknowledgement and the members' copy are the same encoded message."""
    pair = await backend.pair()
    await pair.broker.subscribe("r")
    publication = await pair.publish("r", {"text": "hi", "n": [1, 2]})
    delivered = await pair.deliveries.next()
    assert delivered.payload == publication.payload
    assert fields(delivered) == fields(publication)


async def test_delivered_publications_carry_their_publish_time(backend: Backend) -> None:
    """ts_us of a delivered message or event is the publish time, in unix microseconds."""
    pair = await backend.pair()
    await pair.broker.subscribe("r")
    before = clock.now_us()
    await pair.publish("r", 1)
    await pair.broker.publish_event("r", b'{"type":"typing"}', "c2")
    delivered = [await pair.deliveries.next(), await pair.deliveries.next()]
    after = clock.now_us()
    assert all(before <= p.ts_us <= after for p in delivered), delivered


async def test_events_reach_subscribers_with_offset_0_and_their_origin(
    backend: Backend,
) -> None:
    """publish_event delivers the payload as given, with offset 0 and the sender's conn_id."""
    pair = await backend.pair()
    await pair.broker.subscribe("r")
    await pair.broker.publish_event("r", b'{"type":"typing"}', "c2")
    await pair.broker.publish_event("r", b'{"type":"user_joined"}')
    first, second = await pair.deliveries.next(), await pair.deliveries.next()
    assert (first.room, first.payload, first.offset, first.origin) == (
        "r", b'{"type":"typing"}', 0, "c2"
    )
    assert (second.payload, second.offset, second.origin) == (b'{"type":"user_joined"}', 0, "")


async def test_events_have_no_epoch(backend: Backend) -> None:
    """An ephemeral event belongs to no history: its epoch is empty, as Publication's default."""
    pair = await backend.pair()
    await pair.broker.subscribe("r")
    await pair.broker.publish_event("r", b'{"type":"typing"}', "c2")
    assert (await pair.deliveries.next()).epoch == ""


async def test_events_are_never_stored(backend: Backend) -> None:
    """An event takes no offset and is not in history; the next message continues the count."""
    pair = await backend.pair()
    first = await pair.publish("r", 1)
    await pair.broker.publish_event("r", b'{"type":"typing"}', "c2")
    result = await pair.history.read("r")
    assert (result.offset, result.messages) == (1, [first.payload])
    assert (await pair.publish("r", 2)).offset == 2


async def test_rooms_have_independent_offsets(backend: Backend) -> None:
    """Publishing in one room does not advance another room's offset."""
    pair = await backend.pair()
    await pair.publish("a", 1)
    await pair.publish("a", 2)
    assert (await pair.publish("b", 3)).offset == 1
    assert (await pair.publish("a", 4)).offset == 3


async def test_the_origin_is_carried_to_subscribers(backend: Backend) -> None:
    """Each delivered message names the conn_id that published it."""
    pair = await backend.pair()
    await pair.broker.subscribe("r")
    await pair.publish("r", 1, origin="c1")
    await pair.publish("r", 2, origin="c2")
    assert [(await pair.deliveries.next()).origin for _ in range(2)] == ["c1", "c2"]


async def test_publishing_works_without_any_subscription(backend: Backend) -> None:
    """A node may publish to a room it does not subscribe: the message is stored all the same."""
    pair = await backend.pair()
    publication = await pair.publish("r", 1)
    assert (await pair.history.read("r")).messages == [publication.payload]




# --- idempotent publish ------------------------------------------------------------------------


async def publish_with_key(
    pair: Pair, room: str, data: object, key: str, window: float = 300.0, origin: str = "c1"
) -> Publication:
    return await pair.broker.publish(room, prefix(room, data), origin, idempotency_key=key,
                                     window=window)


async def test_an_idempotent_retry_returns_the_first_result_and_publishes_nothing(
    backend: Backend,
) -> None:
    """A publish retried with the same key returns the first offset and epoch, marked
    duplicate, with an empty payload and the retrier's origin; history holds the message once
    and a subscriber receives it once."""
    pair = await backend.pair()
    await pair.broker.subscribe("r")
    first = await publish_with_key(pair, "r", "hi", "send-1")
    retry = await publish_with_key(pair, "r", "hi", "send-1", origin="c2")
    assert (first.offset, first.duplicate, orjson.loads(first.payload)["data"]) == (
        1, False, "hi")
    assert (retry.room, retry.offset, retry.epoch, retry.duplicate, retry.payload,
            retry.origin) == ("r", 1, first.epoch, True, b"", "c2")
    result = await pair.history.read("r")
    assert (result.offset, result.messages) == (1, [first.payload])
    delivered = await pair.deliveries.next()
    assert fields(delivered) == fields(first) and delivered.duplicate is False
    marker = await pair.publish("r", "marker")
    assert marker.offset == 2  # The retry took no offset.
    await assert_next_is(pair.deliveries, marker)


async def test_concurrent_publishes_with_one_key_publish_exactly_once(backend: Backend) -> None:
    """Of publishes racing with one key, one is published and every other one is its
    duplicate: the check and the publish are one atomic step."""
    pair = await backend.pair()
    results = await asyncio.gather(*(publish_with_key(pair, "r", n, "k") for n in range(10)))
    assert sorted(p.duplicate for p in results) == [False] + [True] * 9
    assert {(p.offset, p.epoch) for p in results} == {(1, results[0].epoch)}
    assert len((await pair.history.read("r")).messages) == 1


async def test_another_key_or_another_room_publishes(backend: Backend) -> None:
    """A key deduplicates only within its room: another key in the room, or the same key in
    another room, publishes; publishes without a key are never deduplicated."""
    pair = await backend.pair(history_size=10)
    assert (await publish_with_key(pair, "r", 1, "k1")).offset == 1
    other_key = await publish_with_key(pair, "r", 1, "k2")
    other_room = await publish_with_key(pair, "s", 1, "k1")
    assert (other_key.offset, other_key.duplicate) == (2, False)
    assert (other_room.room, other_room.offset, other_room.duplicate) == ("s", 1, False)
    assert [(await pair.publish("r", 1)).offset for _ in range(2)] == [3, 4]
    assert (await pair.history.read("r")).offset == 4
    assert len((await pair.history.read("s")).messages) == 1


async def test_after_the_window_the_key_publishes_again(backend: Backend) -> None:
    """A retry within the window is a duplicate; once the window has passed, the same key
    publishes a new message."""
    pair = await backend.pair()
    window = 0.2
    first = await publish_with_key(pair, "r", 1, "k", window=window)
    passed = time.monotonic() + window
    assert (await publish_with_key(pair, "r", 1, "k", window=window)).duplicate
    # The window runs on the real clock (Redis' PX, the memory broker's monotonic clock):
    # wait it out, bounded by the window and a margin.
    await asyncio.sleep(max(0.0, passed - time.monotonic()) + 0.05)
    again = await publish_with_key(pair, "r", 1, "k", window=window)
    assert (again.offset, again.epoch, again.duplicate) == (2, first.epoch, False)
    assert (await publish_with_key(pair, "r", 1, "k", window=window)).offset == 2


async def test_a_retry_after_the_history_expired_returns_the_first_result_as_is(
    backend: Backend,
) -> None:
    """Within the window, a retry returns the first offset and epoch even though the room's
    history expired since and it has a new epoch: the message was published then."""
    pair = await backend.pair(history_ttl=0.2)
    first = await publish_with_key(pair, "r", 1, "k")
    await backend.advance(0.3)
    retry = await publish_with_key(pair, "r", 1, "k")
    assert (retry.offset, retry.epoch, retry.duplicate) == (1, first.epoch, True)
    fresh = await pair.publish("r", 2)
    assert fresh.offset == 1 and fresh.epoch != first.epoch


async def test_an_idempotency_window_must_be_positive(backend: Backend) -> None:
    """A window of 0 or less is refused with ValueError, and nothing is published."""
    pair = await backend.pair()
    for window in (0.0, -1.0):
        with pytest.raises(ValueError):
            await publish_with_key(pair, "r", 1, "k", window=window)
    assert (await pair.publish("r", 1)).offset == 1


# --- control channel ---------------------------------------------------------------------------


async def started_with_control(backend: Backend) -> tuple[Pair, asyncio.Queue[bytes]]:
    """A started pair whose on_control puts each payload on the returned queue."""
    pair = await backend.pair(start=False)
    control: asyncio.Queue[bytes] = asyncio.Queue()
    await pair.broker.start(pair.deliveries.on_publication, pair.deliveries.on_resubscribed,
                            on_control=control.put_nowait)
    assert await pair.broker.wait_connected(WAIT), "broker did not connect"
    return pair, control


async def test_a_control_payload_reaches_the_senders_on_control(backend: Backend) -> None:
    """publish_control hands each payload, as given and once, to on_control of the sending
    node (which is one node of the cluster), never to on_publication."""
    pair, control = await started_with_control(backend)
    await pair.broker.subscribe("r")
    await pair.broker.publish_control(b'{"op":"drain"}')
    await pair.broker.publish_control(b"\x00 raw \n bytes")
    assert await asyncio.wait_for(control.get(), WAIT) == b'{"op":"drain"}'
    assert await asyncio.wait_for(control.get(), WAIT) == b"\x00 raw \n bytes"
    await assert_next_is(pair.deliveries, await pair.publish("r", "marker"))
    await pair.broker.publish_control(b"last")
    assert await asyncio.wait_for(control.get(), WAIT) == b"last"  # Nothing came twice.


async def test_control_payloads_without_on_control_are_dropped(backend: Backend) -> None:
    """A node started without on_control ignores control payloads and delivers on."""
    pair = await backend.pair()
    await pair.broker.subscribe("r")
    await pair.broker.publish_control(b"ignored")
    await assert_next_is(pair.deliveries, await pair.publish("r", "marker"))


async def test_publish_control_is_unavailable_until_started_and_after_close(
    backend: Backend,
) -> None:
    """publish_control raises BrokerUnavailable before start and after close."""
    pair = await backend.pair(start=False)
    with pytest.raises(BrokerUnavailable):
        await pair.broker.publish_control(b"x")
    await pair.start()
    await pair.broker.publish_control(b"x")
    await pair.broker.close()
    with pytest.raises(BrokerUnavailable):
        await pair.broker.publish_control(b"x")
