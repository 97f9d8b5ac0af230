"""The wheel: only the product, with every file a shipped command needs, and a node that runs
from it alone (not from the checkout)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, NodeProcess, RedisServer, native

PACKAGE = ROOT / "node" / "roomcast"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("roomcast-*.whl")
    return built


@pytest.fixture(scope="module")
def unpacked(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def test_the_wheel_holds_the_product_and_its_data_files_only(wheel: Path) -> None:
    """Every module, Lua script, the demo page, the client library and the nginx template; no
    loadtest, no tests."""
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {f"roomcast/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert source <= names, sorted(source - names)
    assert {"roomcast/tools/nginx.conf.template", "roomcast/transports/static/index.html",
            "roomcast/transports/static/roomcast.js", "roomcast/transports/static/roomcast.d.ts",
            "roomcast/backends/lua/publish.lua", "roomcast/py.typed"} <= names
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"roomcast", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                   + ".dist-info"}


@pytest.fixture
def wheel_node(unpacked: Path, redis_server: RedisServer) -> Iterator[NodeProcess]:
    """A node that imports roomcast from the unpacked wheel: PYTHONPATH comes before the
    checkout's editable install on sys.path (test_modules_come_from_the_wheel)."""
    node = NodeProcess(redis_server.url, env={"PYTHONPATH": str(unpacked)})
    node.start()
    yield node
    node.kill()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as reply:
        body: bytes = reply.read()
        return body


def run_in(site: Path, code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code], cwd=site, env=env, check=True,
                            capture_output=True, text=True, timeout=60)
    return result.stdout.strip()


def test_modules_come_from_the_wheel(unpacked: Path) -> None:
    """Run from outside the checkout, roomcast is the unpacked wheel's copy."""
    where = run_in(unpacked, "import roomcast; print(roomcast.__file__)")
    assert Path(where).is_relative_to(unpacked)


async def test_a_node_runs_from_the_wheel_with_redis(wheel_node: NodeProcess) -> None:
    """The wheel's node serves the page and runs its Lua (publish, presence) against Redis."""
    page = await asyncio.to_thread(fetch, f"{wheel_node.http}/")
    assert b"<html" in page.lower()
    client = await native(wheel_node, "u")
    assert (await client.request({"type": "join", "room": "w", "id": 1}))["type"] == "joined"
    ack = await client.request({"type": "publish", "room": "w", "data": 1, "id": 2})
    assert ack["type"] == "published" and ack["offset"] == 1
    presence = await client.request({"type": "presence", "room": "w", "id": 3})
    assert presence["count"] == 1
    await client.close()


def test_the_nginx_template_renders_from_the_wheel(unpacked: Path, tmp_path: Path) -> None:
    """`roomcast cluster` renders its nginx config from the template inside the package."""
    code = (
        "import json; from roomcast.tools import balancer; "
        f"conf = balancer.render([9001], 9100, 9101, {str(tmp_path)!r}, 'c.pem', 'k.pem'); "
        "print(json.dumps([balancer.TEMPLATE.as_posix(), 'server 127.0.0.1:9001' in conf]))"
    )
    template, has_upstream = json.loads(run_in(unpacked, code))
    assert Path(template).is_relative_to(unpacked) and has_upstream is True
