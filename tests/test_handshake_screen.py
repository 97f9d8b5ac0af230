"""The client port's screen of request heads (transports/handshake.py ``screen_head``) answers
exactly what the library's own parser says (``parse_verdict``), also on its one-match path for
the usual upgrade. Sans-I/O: heads in, verdicts out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.transports import handshake

UPGRADE = (b"GET /ws?user_id=u1&username=ann HTTP/1.1\r\n"
           b"Host: 127.0.0.1:8000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"Origin: https://app.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux) \xe9t\xe9\r\n"
           b"\r\n")

TOKEN = b"-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Bytes that matter to the grammar, then a few of every kind.
AWKWARD = b" \t\r\n:\x00\x7f\x80\xff/?=" + TOKEN[:20]

names = st.one_of(
    st.sampled_from([b"Host", b"Upgrade", b"Content-Length", b"content-length",
                     b"Transfer-Encoding", b"TRANSFER-ENCODING", b"Origin", b""]),
    st.binary(min_size=1, max_size=12).map(lambda b: bytes(TOKEN[x % len(TOKEN)] for x in b)),
    st.binary(max_size=8).map(lambda b: bytes(AWKWARD[x % len(AWKWARD)] for x in b)),
)
values = st.one_of(
    st.sampled_from([b"0", b"12", b" 0 ", b"chunked", b"websocket", b""]),
    st.binary(max_size=24),
    st.binary(max_size=12).map(lambda b: bytes(AWKWARD[x % len(AWKWARD)] for x in b)),
)
separators = st.sampled_from([b":", b": ", b":\t", b" :", b""])
endings = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
header_lines = st.tuples(names, separators, values, endings).map(b"".join)
request_lines = st.tuples(
    st.sampled_from([b"GET", b"POST", b"get", b"HEAD", b"G\xe9T", b""]),
    st.sampled_from([b" ", b"  ", b"\t"]),
    st.one_of(st.sampled_from([b"/ws", b"/", b"/ws?x=a b", b"//api", b"/\xc3\xa9", b""]),
              st.binary(max_size=16)),
    st.sampled_from([b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2", b" HTTP/2.0", b" HTTP/1.2",
                     b"HTTP/1.1", b" http/1.1"]),
    endings,
).map(b"".join)


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(header_lines, max_size=6))
    if draw(st.booleans()):  # Around the library's header count limit (128).
        lines += [b"X-Pad: 1\r\n"] * draw(st.integers(120, 130))
    return draw(request_lines) + b"".join(lines) + draw(st.sampled_from([b"\r\n", b"", b"\n"]))


@settings(max_examples=3000, deadline=None)
@given(heads())
def test_the_screen_says_what_the_parser_says(head: bytes) -> None:
    assert handshake.screen_head(head) == handshake.parse_verdict(head)


VALUE_BYTES = bytes([9, *range(0x20, 0x7f), *range(0x80, 0x100)])
plain_gets = st.tuples(
    st.binary(min_size=1, max_size=30).map(lambda b: bytes(0x21 + x % 94 for x in b)),
    st.lists(st.tuples(
        st.binary(min_size=1, max_size=12).map(lambda b: bytes(TOKEN[x % len(TOKEN)] for x in b)),
        st.binary(max_size=20).map(lambda b: bytes(VALUE_BYTES[x % len(VALUE_BYTES)] for x in b)),
    ), max_size=12),
).map(lambda t: b"GET " + t[0] + b" HTTP/1.1\r\n"
      + b"".join(name + b":" + value + b"\r\n" for name, value in t[1]) + b"\r\n")


@settings(max_examples=3000, deadline=None)
@given(plain_gets, st.integers(0, 10_000), st.binary(min_size=1, max_size=2),
       st.sampled_from(["keep", "insert", "replace", "delete"]))
def test_a_plain_get_and_its_near_misses_get_the_parsers_verdict(
        head: bytes, where: int, byte: bytes, how: str) -> None:
    """Well-formed upgrades take the one-match path; the same head with one byte inserted,
    replaced or deleted (a control byte, a colon, a stray CR...) gets exactly the parser's
    verdict, whichever path it took."""
    at = where % len(head)
    if how == "keep":
        if not handshake._BODY_HEADERS.search(head):
            assert handshake._PLAIN_GET.fullmatch(head), head
    elif how == "insert":
        head = head[:at] + byte + head[at:]
    elif how == "replace":
        head = head[:at] + byte + head[at + 1:]
    else:
        head = head[:at] + head[at + 1:]
    assert handshake.screen_head(head) == handshake.parse_verdict(head)


@pytest.mark.parametrize("head", [
    UPGRADE,
    UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
    UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n"),
    UPGRADE.replace(b"\r\n\r\n", b"\r\ntransfer-encoding: chunked\r\n\r\n"),
    UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    UPGRADE.replace(b"GET", b"POST", 1).replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n"),
    UPGRADE.replace(b"Origin:", b"Or igin:"),
    UPGRADE.replace(b"\r\n\r\n", b"\r\nX-Long: " + b"a" * 8200 + b"\r\n\r\n"),
    b"GET /ws HTTP/1.1\r\n" + b"X-Pad: 1\r\n" * 128 + b"\r\n",  # The library's most.
    b"GET /ws HTTP/1.1\r\n" + b"X-Pad: 1\r\n" * 129 + b"\r\n",
    b"GET /ws HTTP/2.0\r\nHost: a\r\n\r\n",
])
def test_the_heads_around_the_one_match_path(head: bytes) -> None:
    assert handshake.screen_head(head) == handshake.parse_verdict(head)


def test_the_usual_upgrade_is_screened_without_the_second_parse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The library parses every head again after the screen: the usual upgrade, a browser's
    GET with its dozen headers, is passed by one match instead of a parse of its own."""
    def parse(head: bytes) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(handshake, "parse_verdict", parse)
    assert handshake.screen_head(UPGRADE) is None
    with pytest.raises(AssertionError):  # A head that names a body is parsed.
        handshake.screen_head(UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"))
