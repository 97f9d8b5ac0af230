"""The one table of WebSocket close codes roomcast sends, and what a client should do after each.

Standard codes are from RFC 6455 section 7.4.1 and the IANA registry. Application codes use the
private range (RFC 6455 section 7.4.2) split so that a client can act without a lookup, as
centrifuge's ``disconnect.go`` does:

* 4000-4499: transient. Reconnect with backoff and jitter, then resume from offsets.
* 4500-4999: terminal. Do not reconnect as is: something about this client must change first.

One code, one meaning. docs/PROTOCOL.md repeats this table; the Python client follows
``should_reconnect``.
"""

from __future__ import annotations

import enum

RECONNECT_RANGE = range(4000, 4500)
TERMINAL_RANGE = range(4500, 5000)


class CloseCode(enum.IntEnum):
    NORMAL = 1000  # The client asked to leave, or the server ended a finished session.
    GOING_AWAY = 1001  # The node is shutting down now (second SIGTERM, no drain).
    POLICY_VIOLATION = 1008  # Flooding, taken nick, join-first, bad room path: do not retry as is.
    MESSAGE_TOO_BIG = 1009  # A frame exceeded --max-message-size.
    INTERNAL_ERROR = 1011  # A bug in the node closed this one connection; safe to retry.
    SERVICE_RESTART = 1012  # Drain: reconnect (after the retry hint) and resume from offsets.
    # Not sent by roomcast; proxies send it for an overloaded upstream. Clients reconnect.
    TRY_AGAIN_LATER = 1013
    # --- 4000-4499: transient, reconnect -------------------------------------------------------
    SLOW_CONSUMER = 4000  # More than --max-send-buffer was queued to this client.
    BACKEND_UNAVAILABLE = 4001  # A compatibility client connected while Redis was unreachable.
    # The token expired and no refresh came within --refresh-grace: get a new token, reconnect.
    TOKEN_EXPIRED = 4002
    # --- 4500-4999: terminal, do not reconnect ---------------------------------------------------
    DISCONNECTED = 4500  # The server disconnected this user on purpose (a kick).
    # No token, or one that is forged, malformed, for another audience or of the wrong kind.
    UNAUTHORIZED = 4501
    STALE_TOKEN = 4502  # The token had expired when it was presented: get a new one first.
    TOO_MANY_CONNECTIONS = 4503  # The user holds --max-connections-per-user connections.


#: Standard codes after which a client should reconnect (with backoff and jitter) and resume.
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
    """True when a client that saw ``code`` should reconnect; None means the socket just died.

    The rule: the standard transient codes in ``RECONNECT``, and the whole 4000-4499 range (so
    that a client knows what to do with a code added after it was written). Everything else,
    4500-4999 included, is terminal.
    """
    return code is None or code in RECONNECT or code in RECONNECT_RANGE
