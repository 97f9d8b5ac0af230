"""The close-code table and which codes a client should reconnect after."""

from __future__ import annotations

import pytest

from node.closecodes import RECONNECT, CloseCode, should_reconnect


def test_close_codes_have_their_rfc_6455_values() -> None:
    """Every close code roomcast sends has its registered numeric value."""
    assert {code.name: int(code) for code in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "SERVICE_RESTART": 1012,
        "TRY_AGAIN_LATER": 1013,
    }


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1012, 1013, None])
def test_clients_reconnect_after_transient_closes(code: int | None) -> None:
    """Going away, abnormal closure, internal error, restart, try-again and a dead socket: retry."""
    assert should_reconnect(code) is True


@pytest.mark.parametrize("code", [1000, 1008, 1009, 1002, 1003, 4000])
def test_clients_do_not_reconnect_after_final_closes(code: int) -> None:
    """A normal close, a policy violation, a too-big message or an unknown code: do not retry."""
    assert should_reconnect(code) is False


def test_reconnect_table_is_exactly_the_transient_codes() -> None:
    """The reconnect table lists exactly 1001, 1006, 1011, 1012 and 1013."""
    assert sorted(int(code) for code in RECONNECT) == [1001, 1006, 1011, 1012, 1013]
