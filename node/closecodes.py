"""The one table of WebSocket close codes roomcast sends, and what a client should do after each.

Standard codes are from RFC 6455 section 7.4.1 and the IANA registry; 4000-4999 are private-use
(RFC 6455 section 7.4.2) and roomcast documents its own there. docs/PROTOCOL.md repeats this table.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    NORMAL = 1000  # The client asked to leave, or the server ended a finished session.
    GOING_AWAY = 1001  # The node is shutting down now (second SIGTERM, no drain).
    POLICY_VIOLATION = 1008  # Flooding, refused nickname, bad path: do not retry as is.
    MESSAGE_TOO_BIG = 1009  # A frame exceeded --max-message-size.
    INTERNAL_ERROR = 1011  # A bug in the node closed this one connection; safe to retry.
    SERVICE_RESTART = 1012  # Drain: reconnect (after the retry hint) and resume from offsets.
    TRY_AGAIN_LATER = 1013  # Overloaded or slow consumer: reconnect after a backoff.


#: Codes after which a client should reconnect (with backoff and jitter) and resume.
RECONNECT = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.INTERNAL_ERROR,
        CloseCode.SERVICE_RESTART,
        CloseCode.TRY_AGAIN_LATER,
        1006,  # Abnormal closure: the TCP connection died without a close frame.
    }
)


def should_reconnect(code: int | None) -> bool:
    """True when a client that saw ``code`` should reconnect; None means the socket just died."""
    return code is None or code in RECONNECT
