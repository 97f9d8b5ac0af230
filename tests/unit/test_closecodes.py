"""The close-code table, its application ranges, and which codes a client reconnects after."""

from __future__ import annotations

import pytest

from roomcast.protocol.closecodes import (
    RECONNECT,
    RECONNECT_RANGE,
    TERMINAL_RANGE,
    CloseCode,
    should_reconnect,
)


def test_close_codes_have_their_documented_values() -> None:
    """Every close code has its RFC 6455 / IANA value or its documented application value."""
    assert {code.name: int(code) for code in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "SERVICE_RESTART": 1012,
        "TRY_AGAIN_LATER": 1013,
        "SLOW_CONSUMER": 4000,
        "BACKEND_UNAVAILABLE": 4001,
        "TOKEN_EXPIRED": 4002,
        "DISCONNECTED": 4500,
        "UNAUTHORIZED": 4501,
        "STALE_TOKEN": 4502,
        "TOO_MANY_CONNECTIONS": 4503,
    }


def test_each_code_has_one_meaning() -> None:
    """No two names share a value: one code, one reason."""
    values = [int(code) for code in CloseCode]
    assert len(values) == len(set(values))


def test_application_codes_sit_in_the_range_that_says_what_to_do() -> None:
    """Transient application codes are in 4000-4499, terminal ones in 4500-4999."""
    assert CloseCode.SLOW_CONSUMER in RECONNECT_RANGE
    assert CloseCode.BACKEND_UNAVAILABLE in RECONNECT_RANGE
    assert CloseCode.TOKEN_EXPIRED in RECONNECT_RANGE  # a new token, then reconnect
    for code in (CloseCode.DISCONNECTED, CloseCode.UNAUTHORIZED, CloseCode.STALE_TOKEN,
                 CloseCode.TOO_MANY_CONNECTIONS):
        assert code in TERMINAL_RANGE


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1012, 1013, 4000, 4001, 4321, 4499, None])
def test_clients_reconnect_after_transient_closes(code: int | None) -> None:
    """Going away, abnormal closure, internal error, restart, try-again, any 4000-4499 code and
    a dead socket: retry."""
    assert should_reconnect(code) is True


@pytest.mark.parametrize("code", [1000, 1008, 1009, 1002, 1003, 3000, 4500, 4777, 4999])
def test_clients_do_not_reconnect_after_final_closes(code: int) -> None:
    """A normal close, a policy violation, a too-big message, a 4500-4999 code or an unknown
    code: do not retry."""
    assert should_reconnect(code) is False


def test_reconnect_table_is_exactly_the_transient_standard_codes() -> None:
    """The standard reconnect set lists exactly 1001, 1006, 1011, 1012 and 1013."""
    assert sorted(int(code) for code in RECONNECT) == [1001, 1006, 1011, 1012, 1013]
