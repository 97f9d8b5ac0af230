"""The browser client library (clients/js/): its unit tests under Node's test runner, its size,
its API names, and the copy the node serves."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess

import pytest

from tests.harness import ROOT

JS = ROOT / "clients" / "js"
STATIC = ROOT / "node" / "roomcast" / "transports" / "static"
#: The issue's budget: at most 10 KB gzipped (read as 10,000 bytes, the stricter reading).
MAX_GZIPPED = 10_000
#: The line of the demo page that the node replaces by the library (transports/http.py).
IMPORT_LINE = 'import { Roomcast } from "./roomcast.js";'


def node() -> str:
    binary = shutil.which("node") or shutil.which("nodejs")
    if binary is None:
        raise RuntimeError("node is not installed (./dev test installs nodejs)")
    return binary


def test_the_unit_tests_pass_under_node_test() -> None:
    """`node --test clients/js/test/`: backoff, close codes, recovery, dedup, publishes."""
    result = subprocess.run([node(), "--test", "clients/js/test/"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    counts = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", result.stdout, re.MULTILINE))
    assert counts["fail"] == "0" and int(counts["pass"]) >= 30, counts


def test_the_library_fits_in_10_kb_gzipped() -> None:
    """The module the node serves stays within the size budget."""
    size = len(gzip.compress((JS / "roomcast.js").read_bytes(), compresslevel=9))
    assert size <= MAX_GZIPPED, f"roomcast.js is {size} bytes gzipped"


@pytest.mark.parametrize("name", ["roomcast.js", "roomcast.d.ts"])
def test_the_node_serves_the_same_library(name: str) -> None:
    """clients/js/ links to the file the node serves and ships in its wheel: one source."""
    assert (JS / name).is_symlink() and (JS / name).resolve() == (STATIC / name).resolve()


def test_the_page_can_inline_the_library() -> None:
    """The demo page imports the library once, and nothing in it ends an inline script."""
    assert (STATIC / "index.html").read_text().count(IMPORT_LINE) == 1
    source = (JS / "roomcast.js").read_text().lower()
    assert "</script" not in source and "<!--" not in source


def test_the_module_exports_the_api_names() -> None:
    """The names the issue fixes exist, in the module and in its declarations."""
    script = (
        "const m = await import(process.argv[1]);"
        "const rc = new m.Roomcast('ws://x/ws', {WebSocket: class {}});"
        "const room = rc.room('chat:lobby');"
        "console.log(JSON.stringify({exports: Object.keys(m).sort(), "
        "rc: ['connect', 'disconnect', 'room', 'on', 'off'].filter((k) => typeof rc[k] === "
        "'function'), room: ['join', 'leave', 'publish', 'on', 'presence', 'history', "
        "'typing'].filter((k) => typeof room[k] === 'function'), state: rc.state}));"
    )
    result = subprocess.run([node(), "--input-type=module", "-e", script,
                             (JS / "roomcast.js").as_uri()], capture_output=True, text=True,
                            timeout=30, check=True)
    found = json.loads(result.stdout)
    assert found == {
        "exports": ["ClosedError", "ConnectionLostError", "HistoryUnavailableError", "Roomcast",
                    "RoomcastError", "ServerError", "backoffDelay", "shouldReconnect"],
        "rc": ["connect", "disconnect", "room", "on", "off"],
        "room": ["join", "leave", "publish", "on", "presence", "history", "typing"],
        "state": "disconnected",
    }
    types = (JS / "roomcast.d.ts").read_text()
    for declaration in ("export class Roomcast", "connect(): Promise<Welcome>", "disconnect()",
                        "room(name: string", "publish(data: unknown): Promise<Position>",
                        "presence(): Promise<Member[]>", "history(options?:", "typing()",
                        "message: (message: MessageEnvelope)", "gap: (event: GapEvent)"):
        assert declaration in types, declaration
