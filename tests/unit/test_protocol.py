"""The native protocol's sans-I/O core: request parsing, validation and envelope bytes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.protocol import envelopes as protocol
from roomcast.protocol.envelopes import (
    MAX_HISTORY_LIMIT,
    Connect,
    ErrorCode,
    History,
    Join,
    Leave,
    Ping,
    Presence,
    ProtocolError,
    Publish,
    Refresh,
    Since,
    Typing,
)

# No example database on disk: these tests must leave nothing behind in the checkout.
FUZZ = settings(database=None, deadline=None, max_examples=300)

# orjson encodes integers only within 64 bits; JSON from clients never holds larger ones either.
json_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_scalars = (
    st.none() | st.booleans() | json_ints | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
room_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-",
    min_size=1,
    max_size=64,
)
epochs = st.text(alphabet="0123456789abcdef", min_size=1, max_size=16)


def parse(obj: Any) -> protocol.Request:
    return protocol.parse_request(orjson.dumps(obj).decode())


def parse_error(obj: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(obj)
    return caught.value


# --- room names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "a" * 64, "Lobby_1.2:x-y", "0", "-", ":", ".", "_"]
)
def test_valid_room_accepts_names_of_1_to_64_allowed_characters(name: str) -> None:
    """Room names of 1-64 letters, digits and _ . : - are accepted."""
    assert protocol.valid_room(name) is True


@pytest.mark.parametrize(
    "name",
    ["", "a" * 65, "a b", "a/b", "room\n", "\nroom", "é", "a{b}", "a*", None, 5, ["a"]],
)
def test_valid_room_rejects_empty_long_or_foreign_characters(name: object) -> None:
    """Empty, over-64-character, non-string or other-character room names are refused."""
    assert protocol.valid_room(name) is False


@pytest.mark.parametrize("kind", ["join", "leave", "publish", "typing", "presence", "history"])
def test_every_room_request_rejects_a_bad_room_and_echoes_the_id(kind: str) -> None:
    """A room request with an invalid room gets bad_request carrying the request id."""
    err = parse_error({"type": kind, "room": "a" * 65, "id": "r1", "data": 1})
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, "r1")


@pytest.mark.parametrize("kind", ["join", "leave", "publish", "typing", "presence", "history"])
def test_every_room_request_needs_a_room(kind: str) -> None:
    """A room request without a room field is bad_request."""
    assert parse_error({"type": kind, "data": 1}).code == ErrorCode.BAD_REQUEST


# --- request types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"type": "ping"}, Ping(None)),
        ({"type": "ping", "id": 3, "room": "!!bad!!"}, Ping(3)),
        ({"type": "join", "room": "r"}, Join("r")),
        ({"type": "join", "room": "r", "id": "j", "nick": "  Ann  "}, Join("r", "j", None, "Ann")),
        (
            {"type": "join", "room": "r", "since": {"offset": 4, "epoch": "ab12"}},
            Join("r", None, Since(4, "ab12")),
        ),
        ({"type": "leave", "room": "r", "id": 9}, Leave("r", 9)),
        ({"type": "publish", "room": "r", "data": {"x": [1]}}, Publish("r", {"x": [1]})),
        ({"type": "publish", "room": "r", "data": None, "id": 1}, Publish("r", None, 1)),
        ({"type": "typing", "room": "r"}, Typing("r")),
        ({"type": "presence", "room": "r", "id": "p"}, Presence("r", "p")),
        ({"type": "history", "room": "r"}, History("r")),
        (
            {"type": "history", "room": "r", "limit": 5, "since": {"offset": 0, "epoch": "e"}},
            History("r", 5, Since(0, "e")),
        ),
    ],
)
def test_parse_request_returns_the_typed_request(obj: dict[str, Any], expected: Any) -> None:
    """Each request type parses into its dataclass with the fields the client sent."""
    assert parse(obj) == expected


def test_parse_request_keeps_non_ascii_data_intact() -> None:
    """A text frame with non-ASCII data is parsed and the data kept intact."""
    assert parse({"type": "publish", "room": "r", "data": "héllo ☃"}) == Publish("r", "héllo ☃")


def test_publish_without_data_is_bad_request() -> None:
    """A publish with no data field is refused with bad_request and the id echoed."""
    err = parse_error({"type": "publish", "room": "r", "id": 5})
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, 5)


@pytest.mark.parametrize("nick", ["", "   ", 5, ["x"], True])
def test_join_rejects_a_blank_or_non_string_nick(nick: object) -> None:
    """A join whose nick is blank or not a string is bad_request."""
    err = parse_error({"type": "join", "room": "r", "nick": nick, "id": "n"})
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, "n")


# --- frames that are not requests ------------------------------------------------------------


@pytest.mark.parametrize(
    "frame", [b'{"type": "ping"}', bytearray(b'{"type": "ping"}'), memoryview(b'{"type":"ping"}')]
)
def test_binary_frames_are_bad_request_even_when_they_hold_json(frame: Any) -> None:
    """Binary frames are refused with bad_request, whatever they contain."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(frame)
    assert caught.value.code == ErrorCode.BAD_REQUEST
    assert caught.value.request_id is None


@pytest.mark.parametrize("frame", ["", "not json", "{", '{"type": "ping"', "\ud800", "[" * 2000])
def test_text_that_is_not_json_is_bad_request(frame: str) -> None:
    """Text frames that are not JSON (including lone surrogates, deep nesting) are bad_request."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(frame)
    assert caught.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("frame", ["[]", '"ping"', "1", "null", "true", '[{"type": "ping"}]'])
def test_json_that_is_not_an_object_is_bad_request(frame: str) -> None:
    """A JSON value other than an object is bad_request."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(frame)
    assert caught.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("kind", [None, 5, ["ping"], {"x": 1}])
def test_missing_or_non_string_type_is_bad_request_with_the_id(kind: object) -> None:
    """A request without a string type is bad_request, echoing a valid id."""
    obj: dict[str, Any] = {"id": "q", "room": "r"}
    if kind is not None:
        obj["type"] = kind
    err = parse_error(obj)
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, "q")


def test_unknown_type_is_unknown_type_with_the_id_echoed() -> None:
    """An unknown request type gets an unknown_type error envelope that carries the client's id."""
    err = parse_error({"type": "dance", "id": 42, "room": "r"})
    assert (err.code, err.request_id) == (ErrorCode.UNKNOWN_TYPE, 42)
    body = orjson.loads(protocol.error_from(err))
    assert body["type"] == "error"
    assert body["code"] == "unknown_type"
    assert body["id"] == 42
    assert "dance" in body["message"]


def test_unknown_type_message_quotes_at_most_32_characters_of_the_type() -> None:
    """A huge unknown type is not echoed back in full in the error message."""
    err = parse_error({"type": "x" * 10_000})
    assert err.code == ErrorCode.UNKNOWN_TYPE
    assert "x" * 32 in err.message
    assert "x" * 33 not in err.message


# --- ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["", "a" * 64, 0, -1, 2**63 - 1, 2**64 - 1])
def test_string_and_integer_ids_are_accepted_and_kept(request_id: object) -> None:
    """Ids that are strings of at most 64 characters or integers come back unchanged."""
    assert parse({"type": "ping", "id": request_id}) == Ping(request_id)


@pytest.mark.parametrize("request_id", ["a" * 65, True, False, 1.5, [1], {"a": 1}])
def test_invalid_ids_are_bad_request_and_not_echoed(request_id: object) -> None:
    """An id that is too long or not a string/integer is bad_request and not echoed back."""
    err = parse_error({"type": "ping", "id": request_id})
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, None)


# --- since and limit -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "since",
    [
        {"offset": -1, "epoch": "e"},
        {"offset": "3", "epoch": "e"},
        {"offset": True, "epoch": "e"},
        {"offset": 1.5, "epoch": "e"},
        {"offset": 1},
        {"epoch": "e"},
        {"offset": 1, "epoch": 5},
        {"offset": 1, "epoch": None},
        [1, "e"],
        "1:e",
        0,
    ],
)
@pytest.mark.parametrize("kind", ["join", "history"])
def test_invalid_since_is_bad_request(kind: str, since: object) -> None:
    """A since that is not {offset: integer >= 0, epoch: string} is bad_request with the id."""
    err = parse_error({"type": kind, "room": "r", "since": since, "id": "s"})
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, "s")


@pytest.mark.parametrize("kind", ["join", "history"])
def test_null_since_means_no_recovery_position(kind: str) -> None:
    """A null since is the same as no since."""
    request = parse({"type": kind, "room": "r", "since": None})
    assert isinstance(request, Join | History)
    assert request.since is None


@pytest.mark.parametrize("limit", [1, 2, MAX_HISTORY_LIMIT])
def test_history_limit_within_1_to_1000_is_accepted(limit: int) -> None:
    """History limits from 1 to 1000 inclusive are accepted."""
    assert parse({"type": "history", "room": "r", "limit": limit}) == History("r", limit)


@pytest.mark.parametrize("limit", [0, -1, MAX_HISTORY_LIMIT + 1, True, 2.0, "10", [5]])
def test_history_limit_outside_bounds_or_not_integer_is_bad_request(limit: object) -> None:
    """History limits below 1, above 1000 or not integers are bad_request with the id."""
    err = parse_error({"type": "history", "room": "r", "limit": limit, "id": 8})
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, 8)


def test_max_history_limit_is_1000() -> None:
    """The documented history limit bound is 1000."""
    assert MAX_HISTORY_LIMIT == 1000


# --- fuzzing ---------------------------------------------------------------------------------


def assert_parses_or_protocol_error(frame: str | bytes) -> None:
    try:
        request = protocol.parse_request(frame)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TYPE)
    else:
        assert isinstance(request, Join | Leave | Publish | Typing | Ping | Presence | History
                          | Connect | Refresh)


@FUZZ
@given(st.text(alphabet=st.characters(exclude_categories=())))
def test_fuzz_arbitrary_text_parses_or_raises_protocol_error(frame: str) -> None:
    """Any text frame (even lone surrogates) yields a request or a ProtocolError, nothing else."""
    assert_parses_or_protocol_error(frame)


@FUZZ
@given(st.binary())
def test_fuzz_arbitrary_bytes_are_bad_request(frame: bytes) -> None:
    """Any binary frame is refused with bad_request."""
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(frame)
    assert caught.value.code == ErrorCode.BAD_REQUEST


@FUZZ
@given(json_values)
def test_fuzz_arbitrary_json_values_parse_or_raise_protocol_error(value: Any) -> None:
    """Any JSON value yields a request or a ProtocolError, nothing else."""
    assert_parses_or_protocol_error(orjson.dumps(value).decode())


request_like = st.fixed_dictionaries(
    {"type": st.sampled_from([*protocol.REQUEST_TYPES, "dance"]) | json_values},
    optional={
        "id": json_values | st.text(max_size=70) | json_ints,
        "room": room_names | json_values,
        "data": json_values,
        "nick": st.text() | json_values,
        "limit": st.integers(-5, 1005) | json_values,
        "since": st.fixed_dictionaries(
            {"offset": json_ints | json_values, "epoch": epochs | json_values}
        )
        | json_values,
    },
)


@FUZZ
@given(request_like)
def test_fuzz_request_shaped_objects_parse_or_raise_protocol_error(obj: dict[str, Any]) -> None:
    """Objects close to real requests yield a request or a ProtocolError, nothing else."""
    assert_parses_or_protocol_error(orjson.dumps(obj).decode())


@FUZZ
@given(
    room=room_names,
    data=json_values,
    user=st.text(),
    ts=st.integers(0, 2**53),
    offset=st.integers(1, 2**63 - 1),
    epoch=epochs,
)
def test_fuzz_finished_message_is_json_with_offset_and_epoch(
    room: str, data: Any, user: str, ts: int, offset: int, epoch: str
) -> None:
    """finish_message(message_prefix(...)) is one JSON object with the data, offset and epoch."""
    sender = protocol.sender(user, user)
    prefix = protocol.message_prefix(room, data, sender, ts)
    payload = protocol.finish_message(prefix, offset, epoch)
    assert orjson.loads(payload) == {
        "type": "message", "room": room, "data": orjson.loads(orjson.dumps(data)),
        "from": {"user_id": user, "username": user}, "ts": ts,
        "offset": offset, "epoch": epoch,
    }


# --- server envelopes ------------------------------------------------------------------------


def test_message_prefix_is_the_envelope_without_its_closing_brace() -> None:
    """message_prefix ends just before the closing brace, so the offset can be appended."""
    prefix = protocol.message_prefix("r", "hi", protocol.sender("u1", "Ann"), 1700)
    assert prefix == b'{"type":"message","room":"r","data":"hi","from":' \
        b'{"user_id":"u1","username":"Ann"},"ts":1700'
    assert protocol.finish_message(prefix, 7, "beef") == prefix + b',"offset":7,"epoch":"beef"}'


def test_history_reply_splices_stored_messages_into_valid_json() -> None:
    """history_reply embeds stored envelopes verbatim and still parses as JSON with every field."""
    stored = [
        protocol.finish_message(
            protocol.message_prefix("r", {"n": n}, protocol.sender("u", "U"), n), n, "e1"
        )
        for n in (3, 4)
    ]
    body = orjson.loads(protocol.history_reply("r", stored, 4, "e1", "h1"))
    assert body == {
        "type": "history", "room": "r", "offset": 4, "epoch": "e1", "id": "h1",
        "messages": [orjson.loads(m) for m in stored],
    }


@pytest.mark.parametrize("request_id", [None, 0, "x"])
def test_history_reply_with_no_messages_is_valid_json(request_id: Any) -> None:
    """An empty history reply parses, with an empty messages list and the id only when given."""
    body = orjson.loads(protocol.history_reply("r", [], 0, "e", request_id))
    expected: dict[str, Any] = {
        "type": "history", "room": "r", "offset": 0, "epoch": "e", "messages": []
    }
    if request_id is not None:
        expected["id"] = request_id
    assert body == expected


@pytest.mark.parametrize("recovered", [True, False])
def test_history_reply_reports_recovered_when_given(recovered: bool) -> None:
    """A history reply to a since request says whether the position could be continued."""
    body = orjson.loads(protocol.history_reply("r", [], 5, "e", 3, recovered=recovered))
    assert body == {
        "type": "history", "room": "r", "offset": 5, "epoch": "e", "id": 3,
        "recovered": recovered, "messages": [],
    }


def test_pong_echoes_the_id_only_when_given() -> None:
    """pong carries the ping's id, including 0, and no id key when the ping had none."""
    assert orjson.loads(protocol.pong()) == {"type": "pong"}
    assert orjson.loads(protocol.pong(0)) == {"type": "pong", "id": 0}


def test_error_envelope_carries_code_message_id_and_extra_fields() -> None:
    """error() builds the documented error envelope, extra fields included."""
    exc = ProtocolError(ErrorCode.RATE_LIMITED, "slow down", "m1", retry_after_ms=51)
    assert orjson.loads(protocol.error_from(exc)) == {
        "type": "error", "code": "rate_limited", "message": "slow down", "id": "m1",
        "retry_after_ms": 51,
    }


def test_error_codes_have_their_documented_values() -> None:
    """Clients match on these exact error code strings."""
    assert {
        name: value for name, value in vars(ErrorCode).items() if name.isupper()
    } == {
        "BAD_REQUEST": "bad_request", "UNKNOWN_TYPE": "unknown_type",
        "RATE_LIMITED": "rate_limited", "TOO_MANY_ROOMS": "too_many_rooms",
        "NOT_JOINED": "not_joined", "UNAVAILABLE": "unavailable",
        "NICK_TAKEN": "nick_taken", "INTERNAL": "internal", "FORBIDDEN": "forbidden",
        "UNKNOWN_NAMESPACE": "unknown_namespace", "ROOM_FULL": "room_full",
        "UNAUTHORIZED": "unauthorized", "TOKEN_EXPIRED": "token_expired",
    }


def test_welcome_joined_left_published_envelopes() -> None:
    """The acknowledgement envelopes hold exactly the documented fields."""
    assert orjson.loads(protocol.welcome("c1", "n1")) == {
        "type": "welcome", "conn_id": "c1", "node_id": "n1"
    }
    assert orjson.loads(protocol.joined("r", "j", offset=3, epoch="e", recovered=True)) == {
        "type": "joined", "room": "r", "id": "j", "offset": 3, "epoch": "e", "recovered": True
    }
    assert orjson.loads(protocol.left("r")) == {"type": "left", "room": "r"}
    assert orjson.loads(protocol.published("r", 9, "e", 2)) == {
        "type": "published", "room": "r", "offset": 9, "epoch": "e", "id": 2
    }


def test_presence_reply_counts_distinct_users_not_connections() -> None:
    """A user with two connections counts once in the presence count."""
    members = [
        {"user_id": "u1", "username": "A", "conn_id": "c1"},
        {"user_id": "u1", "username": "A", "conn_id": "c2"},
        {"user_id": "u2", "username": "B", "conn_id": "c3"},
    ]
    body = orjson.loads(protocol.presence_reply("r", members, "p"))
    assert body == {"type": "presence", "room": "r", "members": members, "count": 2, "id": "p"}


def test_event_and_reconnect_envelopes() -> None:
    """Ephemeral events and the drain hint hold exactly the documented fields."""
    assert orjson.loads(protocol.event("user_left", "r", user_id="u", username="U", ts=5)) == {
        "type": "user_left", "room": "r", "user_id": "u", "username": "U", "ts": 5
    }
    rooms = {"r": {"offset": 3, "epoch": "e"}}
    assert orjson.loads(protocol.reconnect(250, rooms)) == {
        "type": "reconnect", "retry_after_ms": 250, "rooms": rooms
    }


# --- hardening: depth, offsets, printable names, history pages ---------------------------------


def nested_json(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize("depth", [0, 1, protocol.MAX_DATA_DEPTH])
def test_publish_data_up_to_the_depth_limit_is_accepted(depth: int) -> None:
    """Data nested up to MAX_DATA_DEPTH (64) arrays is published as given."""
    frame = '{"type":"publish","room":"r","data":' + nested_json(depth) + "}"
    request = protocol.parse_request(frame)
    assert isinstance(request, Publish)
    assert request.data == orjson.loads(nested_json(depth))


@pytest.mark.parametrize("depth", [protocol.MAX_DATA_DEPTH + 1, 253, 254, 1023])
def test_publish_data_nested_deeper_is_bad_request_with_a_reason(depth: int) -> None:
    """Data nested deeper than 64 levels, up to orjson's parse limit, is bad_request with the
    id: orjson could not encode the envelope around data 254 or more levels deep."""
    frame = '{"type":"publish","room":"r","id":"p","data":' + nested_json(depth) + "}"
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_request(frame)
    assert (caught.value.code, caught.value.request_id) == (ErrorCode.BAD_REQUEST, "p")
    assert "64 levels" in caught.value.message


def test_every_accepted_publish_can_be_encoded_into_its_envelope() -> None:
    """The deepest data accepted still fits in a message envelope (orjson's 254-level limit)."""
    deepest = orjson.loads(nested_json(protocol.MAX_DATA_DEPTH))
    prefix = protocol.message_prefix("r", deepest, protocol.sender("u", "U"), 1)
    assert orjson.loads(protocol.finish_message(prefix, 1, "e"))["data"] == deepest


@pytest.mark.parametrize(
    ("value", "deep"),
    [
        (1, False), ("x", False), ([], False), ({}, False),
        ([[1, 2], {"a": [3]}], False),
        ({"a": {"b": [1] * 10_000}}, False),  # Wide is fine.
        (orjson.loads(nested_json(64)), False),
        (orjson.loads(nested_json(65)), True),
        ({"k": orjson.loads(nested_json(64))}, True),  # Objects count as levels too.
    ],
)
def test_too_deep_counts_array_and_object_levels(value: Any, deep: bool) -> None:
    """too_deep counts nested arrays and objects, not their width."""
    assert protocol.too_deep(value) is deep


@pytest.mark.parametrize("offset", [0, 1, protocol.MAX_OFFSET])
@pytest.mark.parametrize("kind", ["join", "history"])
def test_since_offsets_up_to_2_63_minus_1_are_accepted(kind: str, offset: int) -> None:
    """since.offset may be anything from 0 to 2^63 - 1, which both backends answer alike."""
    request = parse({"type": kind, "room": "r", "since": {"offset": offset, "epoch": "e"}})
    assert isinstance(request, Join | History)
    assert request.since == Since(offset, "e")


@pytest.mark.parametrize("offset", [2**63, 2**64 - 1])
@pytest.mark.parametrize("kind", ["join", "history"])
def test_since_offsets_from_2_63_are_bad_request_naming_the_bound(kind: str, offset: int) -> None:
    """since.offset of 2^63 or more is bad_request, and the message says the bound."""
    err = parse_error({"type": kind, "room": "r", "id": "s",
                       "since": {"offset": offset, "epoch": "e"}})
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, "s")
    assert str(2**63 - 1) in err.message


PRINTABLE = ["alice", "Zoë", "李小龍", "o'brien-2", "a b", "🎉", "e\u0301", "x\u00a0y", "Ωμέγα"]
NOT_PRINTABLE = [
    "nul\x00", "tab\t", "line\nbreak", "cr\r", "del\x7f", "c1\x85",  # Cc
    "bidi\u202eevil", "zero\u200bwidth", "zwj\u200d", "bom\ufeff", "lrm\u200e",  # Cf
    "sep\u2028x", "para\u2029x",  # Zl, Zp
    "priv\ue000", "unassigned\U000e0fff",  # Co, Cn
]


@pytest.mark.parametrize("text", PRINTABLE)
def test_printable_accepts_letters_marks_symbols_and_spaces(text: str) -> None:
    """Letters of any script, combining marks, emoji and spaces are printable."""
    assert protocol.printable(text) is True


@pytest.mark.parametrize("text", NOT_PRINTABLE)
def test_printable_refuses_controls_format_separators_private_and_unassigned(text: str) -> None:
    """Controls, format characters (bidi, zero-width), line/paragraph separators, private-use
    and unassigned code points are not printable."""
    assert protocol.printable(text) is False


def test_printable_refuses_a_lone_surrogate() -> None:
    """A lone surrogate (category Cs) is not printable."""
    assert protocol.printable("a\ud800") is False


@pytest.mark.parametrize("nick", [f"{text}x" for text in NOT_PRINTABLE])
def test_join_with_a_nick_that_is_not_printable_is_bad_request(nick: str) -> None:
    """A join nick with a character that is not printable inside it is bad_request (whitespace
    around a nick is stripped first, as before)."""
    err = parse_error({"type": "join", "room": "r", "nick": nick, "id": 9})
    assert (err.code, err.request_id) == (ErrorCode.BAD_REQUEST, 9)
    assert err.message.startswith("nick may have only printable characters")


@pytest.mark.parametrize("nick", PRINTABLE)
def test_join_with_a_printable_nick_is_accepted(nick: str) -> None:
    """Printable nicks of any script are accepted, stripped."""
    assert parse({"type": "join", "room": "r", "nick": f" {nick} "}) == Join("r", nick=nick)


@pytest.mark.parametrize("value", ["", "a" * 64, 0, -(2**63), 2**64 - 1])
def test_valid_id_accepts_short_strings_and_integers(value: object) -> None:
    """Ids are strings of at most 64 characters or integers."""
    assert protocol.valid_id(value) is True


@pytest.mark.parametrize("value", ["a" * 65, True, 1.5, None, [1], {"a": 1}])
def test_valid_id_refuses_everything_else(value: object) -> None:
    """Long strings, booleans, floats, null, arrays and objects are not ids."""
    assert protocol.valid_id(value) is False


def stored_messages(count: int, size: int) -> list[bytes]:
    return [
        protocol.finish_message(protocol.message_prefix(
            "r", "x" * size, protocol.sender("u", "U"), n), n, "e") for n in range(1, count + 1)
    ]


def test_history_page_keeps_the_whole_reply_within_the_budget() -> None:
    """A page is the oldest messages whose reply fits in max_bytes, with more=True; the reply
    built from it is at most max_bytes."""
    messages = stored_messages(50, 1000)
    page, more = protocol.history_page(messages, 10_000)
    assert more is True
    assert page == messages[: len(page)] and 1 <= len(page) < 50
    reply = protocol.history_reply("r", page, 50, "e", "x" * 64, True, more)
    assert len(reply) <= 10_000
    # One more message would not have fitted.
    longer = protocol.history_reply("r", messages[: len(page) + 1], 50, "e", "x" * 64, True, True)
    assert len(longer) > 10_000 - protocol.HISTORY_HEAD_BYTES


def test_history_page_of_what_fits_is_everything_and_says_no_more() -> None:
    """When every message fits, the page is all of them and more is False."""
    messages = stored_messages(5, 10)
    assert protocol.history_page(messages, 1024) == (messages, False)
    assert protocol.history_page([], 1024) == ([], False)


def test_history_page_holds_at_least_one_message_however_large() -> None:
    """A message larger than the budget is sent alone, so that paging always moves on."""
    messages = stored_messages(3, 5000)
    assert protocol.history_page(messages, 1024) == (messages[:1], True)
    assert protocol.history_page(messages[2:], 1024) == (messages[2:], False)


def test_history_reply_says_more_only_when_there_is_more() -> None:
    """more: true comes before the id; a last page carries no more field at all."""
    page = protocol.history_reply("r", [], 5, "e", 3, recovered=True, more=True)
    assert page == (b'{"type":"history","room":"r","offset":5,"epoch":"e","recovered":true,'
                    b'"more":true,"id":3,"messages":[]}')
    assert b"more" not in protocol.history_reply("r", [], 5, "e", 3, recovered=True)
