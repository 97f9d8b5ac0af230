"""The FastAPI-tutorial and python-websockets-tutorial dialects: parsing and re-encoding."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.protocol import dialects
from roomcast.protocol import envelopes as protocol
from roomcast.protocol.codecs import FastApiCodec
from roomcast.protocol.dialects import Ping, Say, Typing, Unknown

FUZZ = settings(database=None, deadline=None, max_examples=200)

TS = 1_700_000_000_123  # 2023-11-14T22:13:20.123Z
TS_ISO = "2023-11-14T22:13:20.123+00:00"


def native_message(data: Any) -> dict[str, Any]:
    prefix = protocol.message_prefix("lobby", data, protocol.sender("u1", "Ann"), TS)
    parsed: dict[str, Any] = orjson.loads(protocol.finish_message(prefix, 3, "e"))
    return parsed


def test_iso_formats_unix_ms_as_utc_with_milliseconds() -> None:
    """Timestamps are shown as ISO 8601 UTC with exactly three fractional digits."""
    assert dialects.iso(TS) == TS_ISO
    assert dialects.iso(0) == "1970-01-01T00:00:00.000+00:00"


@pytest.mark.parametrize(
    ("data", "text"), [("hi", "hi"), ({"a": 1}, '{"a":1}'), (5, "5"), (None, "null")]
)
def test_as_text_shows_strings_as_is_and_other_data_as_json(data: Any, text: str) -> None:
    """Text-only dialects see strings unchanged and anything else as compact JSON."""
    assert dialects.as_text(data) == text


# --- FastAPI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "action"),
    [
        ("hello there", Say("hello there")),
        (b"hello bytes", Say("hello bytes")),
        (b"caf\xff", Say("caf\ufffd")),
        ("42", Say("42")),
        ('["a"]', Say('["a"]')),
        ('{"type": "message", "content": "hi"}', Say("hi")),
        ('{"content": {"rich": true}}', Say({"rich": True})),
        ('{"type": "message"}', Say("")),
        ('{"type": "typing"}', Typing()),
        ('{"type": "ping"}', Ping()),
        ('{"type": "dance"}', Unknown("dance")),
        ('{"type": 7}', Unknown("7")),
    ],
)
def test_parse_fastapi_maps_frames_to_actions(frame: str | bytes, action: object) -> None:
    """Plain text and non-object JSON are messages; objects are dispatched on their type."""
    assert dialects.parse_fastapi(frame) == action


def test_parse_fastapi_cuts_unknown_types_to_32_characters() -> None:
    """An unknown type is kept to 32 characters for the error shown back."""
    assert dialects.parse_fastapi(orjson.dumps({"type": "y" * 500})) == Unknown("y" * 32)


@FUZZ
@given(st.text() | st.binary())
def test_fuzz_parse_fastapi_never_raises(frame: str | bytes) -> None:
    """Any frame of the FastAPI dialect maps to an action instead of raising."""
    assert isinstance(dialects.parse_fastapi(frame), Say | Typing | Ping | Unknown)


def test_encode_fastapi_message_has_the_tutorial_fields() -> None:
    """A native message is shown to FastAPI clients with user, content, ISO time and room."""
    assert orjson.loads(dialects.encode_fastapi(native_message({"k": "v"})) or b"") == {
        "type": "message", "user_id": "u1", "username": "Ann", "content": {"k": "v"},
        "timestamp": TS_ISO, "room_id": "lobby",
    }


def test_encode_fastapi_typing() -> None:
    """A native typing event is shown with the typist's user id and name."""
    env = orjson.loads(
        protocol.event("typing", "lobby", **{"from": protocol.sender("u2", "Bo")})
    )
    assert orjson.loads(dialects.encode_fastapi(env) or b"") == {
        "type": "typing", "user_id": "u2", "username": "Bo", "room_id": "lobby"
    }


@pytest.mark.parametrize(("kind", "verb"), [("user_joined", "joined"), ("user_left", "left")])
def test_encode_fastapi_user_events(kind: str, verb: str) -> None:
    """Join and leave events carry a readable message and an ISO timestamp."""
    env = orjson.loads(protocol.event(kind, "lobby", user_id="u3", username="Cy", ts=TS))
    assert orjson.loads(dialects.encode_fastapi(env) or b"") == {
        "type": kind, "user_id": "u3", "username": "Cy", "room_id": "lobby",
        "timestamp": TS_ISO, "message": f"Cy {verb} the room",
    }


@pytest.mark.parametrize("kind", ["pong", "history", "reconnect", None])
def test_encode_fastapi_hides_envelopes_it_has_no_form_for(kind: str | None) -> None:
    """Envelopes the FastAPI tutorial does not know are not sent to its clients."""
    assert dialects.encode_fastapi({"type": kind, "room": "lobby"}) is None


def test_fastapi_members_and_error() -> None:
    """The member list and error envelopes have the tutorial's shape."""
    assert orjson.loads(dialects.fastapi_members(["a", "b"])) == {
        "type": "room_members", "members": ["a", "b"], "count": 2
    }
    assert orjson.loads(dialects.fastapi_error("nope")) == {"type": "error", "message": "nope"}


# --- python-websockets tutorial -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("  Ann  ", "Ann"), ("x" * 30, "x" * 20), ("Ann" + " " * 17 + "Bo", "Ann"),
        ("", ""), ("   ", ""), (None, ""), (5, ""),
    ],
)
def test_clean_nick_strips_then_cuts(raw: object, cleaned: str) -> None:
    """Nicks are stripped, cut to the maximum length (no trailing blanks), non-strings empty."""
    assert dialects.clean_nick(raw, 20) == cleaned


@pytest.mark.parametrize(
    ("frame", "parsed"),
    [
        ('{"type": "join", "nick": "Ann"}', {"type": "join", "nick": "Ann"}),
        (b'{"type": "chat", "text": "hi"}', {"type": "chat", "text": "hi"}),
        ("hello", None),
        ("[1, 2]", None),
        (b"\xff\xfe", None),
    ],
)
def test_parse_tutorial_returns_objects_only(frame: str | bytes, parsed: object) -> None:
    """Tutorial frames are JSON objects; anything else is reported as None."""
    assert dialects.parse_tutorial(frame) == parsed


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        (native_message("hi"), {"type": "chat", "nick": "Ann", "text": "hi"}),
        (native_message([1, 2]), {"type": "chat", "nick": "Ann", "text": "[1,2]"}),
        (
            {"type": "user_joined", "room": "chat", "user_id": "Bo", "username": "Bo"},
            {"type": "join", "nick": "Bo", "text": ""},
        ),
        (
            {"type": "user_left", "room": "chat", "user_id": "Bo", "username": "Bo"},
            {"type": "leave", "nick": "Bo", "text": ""},
        ),
    ],
)
def test_encode_tutorial(env: dict[str, Any], shown: dict[str, Any]) -> None:
    """Messages become chat lines and joins/leaves become join/leave lines."""
    assert orjson.loads(dialects.encode_tutorial(env) or b"") == shown


def test_encode_tutorial_hides_typing() -> None:
    """The tutorial has no typing indicator, so typing events are not sent to it."""
    assert dialects.encode_tutorial({"type": "typing", "room": "chat"}) is None


def test_encoders_cover_both_compatibility_dialects() -> None:
    """Every non-native dialect has an encoder, keyed by its name."""
    assert sorted(dialects.ENCODERS) == ["fastapi", "tutorial"]
    assert dialects.ENCODERS["fastapi"] is dialects.encode_fastapi
    assert dialects.ENCODERS["tutorial"] is dialects.encode_tutorial


# --- hardening ---------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 254, 1023])
def test_fastapi_content_nested_too_deep_is_bad_request(depth: int) -> None:
    """A FastAPI message whose content nests deeper than 64 levels is refused (bad_request,
    naming the dialect's field), not published."""
    frame = '{"type":"message","content":' + "[" * depth + "]" * depth + "}"
    with pytest.raises(protocol.ProtocolError) as caught:
        FastApiCodec("lobby").decode(frame)
    assert caught.value.code == protocol.ErrorCode.BAD_REQUEST
    assert caught.value.message.startswith("content must not nest")


def test_fastapi_content_within_the_limit_is_published() -> None:
    """Nested content up to the limit is published unchanged."""
    content = orjson.loads("[" * 64 + "]" * 64)
    request = FastApiCodec("lobby").decode(orjson.dumps({"content": content}).decode())
    assert request == protocol.Publish("lobby", content)


@pytest.mark.parametrize(
    ("kind", "shown"),
    [("[" * 1023 + "]" * 1023, "[...]"), ('{"a": {"b": 1}}', "{...}"), ("null", "None")],
)
def test_parse_fastapi_shows_an_unknown_type_without_its_nesting(kind: str, shown: str) -> None:
    """An array or object as type is shown by its brackets only: its text may nest 1023 deep
    (more than Python's recursion limit)."""
    assert dialects.parse_fastapi('{"type":' + kind + "}") == Unknown(shown)
