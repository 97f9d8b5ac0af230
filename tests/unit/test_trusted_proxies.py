"""Which hop of X-Forwarded-For is the client, with --trusted-proxies addresses and CIDRs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from websockets.datastructures import Headers

from roomcast.transports.websocket import client_address


def peer(address: str) -> Any:
    return SimpleNamespace(remote_address=(address, 40000))


@pytest.mark.parametrize(("trusted", "forwarded", "expected"), [
    ((), "1.2.3.4", "10.1.2.3"),                            # No proxy trusted: the peer.
    (("10.1.2.3",), "1.2.3.4", "1.2.3.4"),                  # The exact proxy address.
    (("10.0.0.0/8",), "1.2.3.4", "1.2.3.4"),                # A range of balancer pods.
    (("10.0.0.0/8",), "6.6.6.6, 1.2.3.4, 10.9.9.9", "1.2.3.4"),  # Past every trusted hop.
    (("192.168.0.0/16",), "1.2.3.4", "10.1.2.3"),           # Another range: not believed.
    (("10.0.0.0/8",), "not-an-ip, 1.2.3.4", "1.2.3.4"),
])
def test_the_client_is_the_first_untrusted_hop_from_the_right(
        trusted: tuple[str, ...], forwarded: str, expected: str) -> None:
    """X-Forwarded-For is walked from the right past trusted proxies, addresses or CIDRs; a
    peer that is not trusted is the client whatever the header says."""
    headers = Headers([("X-Forwarded-For", forwarded)])
    assert client_address(peer("10.1.2.3"), headers, trusted) == expected
