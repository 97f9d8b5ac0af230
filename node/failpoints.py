"""Fault injection for the test suite, read once from ROOMCAST_FAILPOINTS (comma-separated).

Off unless that variable is set; there is no flag, and nothing here runs in a normal node.

* ``crash_on_data``: a publish whose data is the string "__crash__" raises inside the handler,
  to prove that a crash closes only that connection with 1011.
"""

from __future__ import annotations

import os

ACTIVE = frozenset(p.strip() for p in os.environ.get("ROOMCAST_FAILPOINTS", "").split(",") if p)


def crash_on_data(data: object) -> None:
    if "crash_on_data" in ACTIVE and data == "__crash__":
        raise RuntimeError("failpoint crash_on_data")
