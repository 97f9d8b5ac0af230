"""The load tools: the bench's wire codecs and figures, tiny real benches, a short Locust run.

The socket.io bench (test_socketio_bench_beside_roomcast) runs only with ROOMCAST_SOCKETIO=1: it
needs node and npm, and installs the pinned packages from the npm registry on first use.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest import bench, npmcache, report, sio, wire
from roomcast.cli import build_parser
from roomcast.config import Config
from tests.harness import ROOT, NodeProcess

# --- sans-I/O -----------------------------------------------------------------------------------


def test_accept_matches_rfc_example() -> None:
    """Sec-WebSocket-Accept is computed as in RFC 6455 section 1.3's example."""
    assert wire.accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_client_frames_are_masked_and_unmask_back() -> None:
    """A client frame sets the mask bit and XORs the payload with the key (section 5.3)."""
    payload = b'{"type":"join","room":"r"}' * 10  # 260 bytes: a 16-bit length.
    frame = wire.encode_frame(wire.OP_TEXT, payload, mask=b"\x01\x02\x03\x04")
    assert frame[0] == 0x81 and frame[1] == 0x80 | 126
    assert int.from_bytes(frame[2:4], "big") == len(payload)
    assert frame[4:8] == b"\x01\x02\x03\x04"
    assert wire.mask_payload(frame[8:], b"\x01\x02\x03\x04") == payload


def test_split_frames_keeps_a_partial_frame_for_later() -> None:
    """Complete server frames are returned; an incomplete tail is left in the buffer."""
    long = b"y" * 300
    stream = b"\x81\x02hi" + b"\x81\x7e" + (300).to_bytes(2, "big") + long + b"\x89\x00"
    frames, used = wire.split_frames(stream + b"\x81\x05ab")
    assert frames == [(0x81, b"hi"), (0x81, long), (0x89, b"")]
    assert used == len(stream)
    with pytest.raises(wire.WireError):
        wire.split_frames(b"\x81\x82abcd")  # A masked server frame.


def test_read_stamp_in_both_servers_envelopes() -> None:
    """seq and sent_ns are found in roomcast's message and in the reference's echo."""
    frame = wire.publish_frame("bench-0", 7, 1_700_000_000_123_456_789, size=100)
    assert len(frame) == 100  # Padded to the size exactly (the header is shorter).
    assert wire.read_stamp(frame) == (7, 1_700_000_000_123_456_789)
    data = json.loads(frame)["data"]
    envelope = json.dumps({"type": "message", "room": "bench-0", "data": data,
                           "from": {"user_id": "u"}, "ts": 1, "offset": 3, "epoch": "e"})
    assert wire.read_stamp(envelope.encode()) == (7, 1_700_000_000_123_456_789)
    assert wire.read_stamp(b'{"type":"user_joined","room":"bench-0"}') is None


def test_publish_frame_with_an_id_and_roomcast_acks() -> None:
    """A publish asking for an ack carries its id; published/error answers give (id, ok)."""
    frame = wire.publish_frame("bench-0", 41, 1_700_000_000_000_000_000, size=120,
                               request_id=41)
    assert len(frame) == 120
    request = json.loads(frame)
    assert request["id"] == 41 and request["type"] == "publish" and request["room"] == "bench-0"
    assert wire.read_stamp(frame) == (41, 1_700_000_000_000_000_000)
    assert wire.read_ack(b'{"type":"published","room":"bench-0","offset":42,"epoch":"e",'
                         b'"id":41}') == (41, True)
    assert wire.read_ack(b'{"type":"error","code":"rate_limited","message":"slow down",'
                         b'"id":7}') == (7, False)
    assert wire.read_ack(b'{"type":"error","code":"bad_request","message":"x"}') is None
    assert wire.read_ack(b'{"type":"message","room":"bench-0","data":{"seq":1}}') is None


def test_socketio_engineio_packets_parse() -> None:
    """Engine.IO open/ping and Socket.IO connect, event, ack and namespaced packets decode."""
    opened = sio.parse(b'0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000}')
    assert opened.kind == "open"
    assert opened.json() == {"sid": "abc", "upgrades": [], "pingInterval": 25000,
                             "pingTimeout": 20000}
    assert sio.parse(sio.PING).kind == "ping" and sio.PONG == b"3"
    assert sio.parse(b'40{"sid":"xyz"}') == sio.Packet("connect", b'{"sid":"xyz"}')
    event = sio.parse(b'42["message",{"seq":3,"sent_ns":9,"pad":"x"}]')
    assert (event.kind, event.ack_id, event.namespace) == ("event", None, "/")
    assert event.json() == ["message", {"seq": 3, "sent_ns": 9, "pad": "x"}]
    assert sio.parse(b"4312[{\"ok\":true}]") == sio.Packet("ack", b'[{"ok":true}]', 12)
    chat = sio.parse(b'42/chat,7["hi"]')
    assert (chat.kind, chat.namespace, chat.ack_id, chat.data) == ("event", "/chat", 7, b'["hi"]')
    assert sio.parse(b'451-["up",{"_placeholder":true,"num":0}]').kind == "binary_event"
    assert sio.parse(b'44{"message":"not authorized"}').kind == "connect_error"
    for bad in (b"", b"9", b"4", b"49"):
        with pytest.raises(sio.SioError):
            sio.parse(bad)


def test_socketio_event_frames_and_acks() -> None:
    """A publish event embeds the reference payload verbatim; its ack is read back by id."""
    body = wire.publish_frame("bench-1", 5, 123, size=100)
    assert sio.event_frame("publish", body) == b'42["publish",' + body + b"]"
    asked = sio.event_frame("publish", body, ack_id=5)
    assert asked.startswith(b'425["publish",{')
    packet = sio.parse(asked)
    assert (packet.kind, packet.ack_id) == ("event", 5)
    assert packet.json() == ["publish", json.loads(body)]
    # What a subscriber gets: the stamp is found inside socket.io's message event.
    assert wire.read_stamp(b'42["message",' + body + b"]") == (5, 123)
    assert sio.read_ack(b'435[{"ok":true}]') == (5, True)
    assert sio.read_ack(b'436[{"ok":false}]') == (6, False)
    assert sio.read_ack(b'42["message",{}]') is None
    assert sio.read_ack(b"43[]") is None  # An ack without an id is not ours.


def test_bench_arguments_are_checked() -> None:
    """Modes that cannot work are refused with one line; -S defaults to 1 member with --acked."""
    parser = bench.build_parser()

    def problem(*argv: str) -> str | None:
        return bench.check(parser.parse_args(list(argv)))

    assert "--socketio goes with" in (problem("--target", "reference", "--socketio") or "")
    assert "--socketio goes with" in (problem("--target", "url", "--url", "ws://h:1/ws",
                                              "--socketio") or "")
    assert "reference server sends none" in (problem("--target", "reference", "--acked") or "")
    assert "drop --saturate" in (problem("--acked", "--saturate") or "")
    assert problem("--target", "roomcast-cluster", "--acked", "--socketio") is None
    acked = parser.parse_args(["--acked"])
    assert bench.check(acked) is None and acked.subscribers == 1 and acked.window == 256
    fanout = parser.parse_args([])
    assert bench.check(fanout) is None and fanout.subscribers == 1000


def test_percentiles_are_nearest_rank_in_ms() -> None:
    """p50/p99/max use the nearest rank, in milliseconds from microsecond samples."""
    figures = report.percentiles(list(range(1000, 101_000, 1000)))  # 1..100 ms
    assert (figures["p50"], figures["p95"], figures["p99"], figures["max"]) == (
        50.0, 95.0, 99.0, 100.0)
    assert report.percentiles([])["p99"] is None


def test_roomcast_bench_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """`roomcast bench --help` explains the bench's flags."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--target", "--saturate", "--sweep", "--max-seconds", "--no-reference",
                 "--socketio", "--acked", "--window"):
        assert flag in text


# --- real processes -----------------------------------------------------------------------------


def test_tiny_bench_against_embedded_and_reference(tmp_path: Path) -> None:
    """A tiny bench finishes, loses and duplicates nothing, and prints the reference ratio."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--target", "roomcast-embedded",
         "-S", "20", "-M", "30", "-P", "100", "-K", "20", "--max-seconds", "40",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=50,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["error"] is None
    [point] = doc["points"]
    for run in (point["target"], point["reference"]):
        assert run["connected"] == 20
        assert run["delivered"] == run["expected"] == 20 * 30
        assert run["lost"] == 0 and run["duplicated"] == 0 and run["misrouted"] == 0
        assert run["latency_ms"]["p99"] is not None
        assert all(p["pid"] > 0 for p in run["server"]["processes"])
        assert run["out_of_order"] == 0
        assert 0 < run["connect_s"] <= run["setup_s"]
    assert point["target"]["target"] == "roomcast-embedded"
    assert point["socketio"] is None and point["ratios"]["connect_s"] is not None
    assert "ratio roomcast/reference" in proc.stdout
    assert "fan-out latency p99 ms" in proc.stdout
    assert "connect + join s" in proc.stdout


def _bench(tmp_path: Path, *argv: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
    """Run the bench with ``argv``; its JSON results and stdout (asserting it exited 0)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", *argv, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["error"] is None
    return doc, proc.stdout


def _assert_acked_exactly_once(run: dict[str, Any], members: int, messages: int) -> None:
    assert run["mode"] == "acked"
    assert run["connected"] == members
    assert run["sent"] == run["acked"] == messages
    assert run["refused"] == run["unanswered"] == 0
    assert run["acks_out_of_order"] == run["duplicate_acks"] == run["stray_acks"] == 0
    assert run["delivered"] == run["expected"] == members * messages
    assert run["lost"] == run["duplicated"] == run["out_of_order"] == run["misrouted"] == 0
    assert run["acked_per_s"] > 0 and run["ack_latency_ms"]["p99"] is not None


@pytest.mark.parametrize("alone", [False, True])
def test_cluster_bench_runs_the_reference_as_a_bare_cluster_over_redis(
    tmp_path: Path, alone: bool,
) -> None:
    """Beside two roomcast nodes the reference runs as two processes sharing a fresh
    redis-server: the subscribers of the second one get every message only through Redis.
    With --reference-alone it is one process without Redis."""
    doc, stdout = _bench(tmp_path, "--target", "roomcast-cluster", "--nodes", "2", "-S", "20",
                         "-M", "30", "-P", "100", "-K", "20", "--max-seconds", "50",
                         *(["--reference-alone"] if alone else []))
    [point] = doc["points"]
    ref = point["reference"]
    names = sorted(p["name"] for p in ref["server"]["processes"])
    if alone:
        assert ref["target"] == "reference" and names == ["reference"]
    else:
        assert ref["target"] == "reference-cluster"
        assert names == ["redis", "reference-0", "reference-1"]
    assert ref["connected"] == 20
    assert ref["delivered"] == ref["expected"] == 20 * 30
    assert ref["lost"] == 0 and ref["duplicated"] == 0 and ref["out_of_order"] == 0
    assert "ratio roomcast/reference" in stdout
    # Every server meets a connect storm with the same listen backlog: the node's default.
    for run in (point["target"], ref):
        for process in run["server"]["processes"]:
            if process["name"] != "redis":
                at = process["argv"].index("--backlog")
                assert process["argv"][at + 1] == str(Config().backlog), process["argv"]
        assert run["connect_listen_overflows"] is not None
    assert "connect SYNs dropped" in stdout


def test_acked_bench_on_an_embedded_node(tmp_path: Path) -> None:
    """--acked on one node: every publish acked in order, each member gets each one once."""
    doc, stdout = _bench(tmp_path, "--target", "roomcast-embedded", "--acked", "-S", "2",
                         "-M", "300", "--window", "32", "--max-seconds", "40")
    [point] = doc["points"]
    assert point["reference"] is None and point["socketio"] is None
    run = point["target"]
    _assert_acked_exactly_once(run, 2, 300)
    assert run["member_urls"] == [run["publish_url"]]  # One node: the member is on node 0.
    assert "acked publishes/s" in stdout and "member out of order" in stdout


@pytest.mark.redis
def test_acked_bench_across_two_cluster_nodes(tmp_path: Path) -> None:
    """--acked on a 2-node cluster: the members on node 1 get every message acked on node 0."""
    doc, stdout = _bench(tmp_path, "--target", "roomcast-cluster", "--nodes", "2", "--acked",
                         "-S", "2", "-M", "300", "--window", "64", "--max-seconds", "40")
    [point] = doc["points"]
    run = point["target"]
    _assert_acked_exactly_once(run, 2, 300)
    assert len(run["member_urls"]) == 1 and run["member_urls"][0] != run["publish_url"]
    assert "acked publishes/s" in stdout


def _socketio_ready() -> None:
    """Skip unless ROOMCAST_SOCKETIO=1; then skip only when npm cannot reach its registry and
    the packages are not installed yet (node and npm missing is a failure)."""
    if os.environ.get("ROOMCAST_SOCKETIO") != "1":
        pytest.skip("set ROOMCAST_SOCKETIO=1 to run the socket.io bench (node, npm, registry)")
    npmcache.node_binary()
    npmcache.npm_binary()
    if not npmcache.is_installed() and not npmcache.registry_reachable():
        pytest.skip("npm cannot reach its registry (npm ping failed) to install socket.io")


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_socketio_bench_beside_roomcast(tmp_path: Path) -> None:
    """--socketio: a 2-process socket.io cluster gets a third column and ratios, loses nothing,
    and its ack callbacks make an --acked run that loses nothing either."""
    _socketio_ready()
    doc, stdout = _bench(tmp_path, "--target", "roomcast-cluster", "--nodes", "2", "--socketio",
                         # 100 messages: enough server CPU in each run (5 clock ticks at least)
                         # for a deliveries-per-CPU-s figure.
                         "-S", "20", "-M", "100", "-P", "200", "-K", "20", "--max-seconds", "90",
                         timeout=150)
    [point] = doc["points"]
    sio_run = point["socketio"]
    assert sio_run["target"] == "socketio-cluster"
    assert [p["name"] for p in sio_run["server"]["processes"]] == [
        "redis", "socketio-0", "socketio-1"]
    assert all(p["cpu_s"] is not None and p["peak_rss_kib"] for p in
               sio_run["server"]["processes"])
    assert sio_run["connected"] == 20
    assert sio_run["delivered"] == sio_run["expected"] == 20 * 100
    assert sio_run["lost"] == sio_run["duplicated"] == sio_run["out_of_order"] == 0
    assert sio_run["latency_ms"]["p99"] is not None and sio_run["idle"]["kib_per_conn"]
    assert point["ratios_socketio"]["deliveries_per_cpu_s"] is not None
    assert "roomcast/socket.io" in stdout and "ratio roomcast/socket.io" in stdout

    doc, stdout = _bench(tmp_path, "--target", "roomcast-cluster", "--nodes", "2", "--socketio",
                         "--acked", "-S", "2", "-M", "200", "--max-seconds", "60", timeout=120)
    [point] = doc["points"]
    _assert_acked_exactly_once(point["socketio"], 2, 200)
    assert point["socketio"]["member_urls"] != [point["socketio"]["publish_url"]]


def test_locust_big_room_reports_fanout(tmp_path: Path, node: NodeProcess) -> None:
    """A 5 s headless Locust run against a node exits 0 with FANOUT rows and no failures."""
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
         "--headless", "-u", "10", "-r", "10", "-t", "5s", "--only-summary",
         "--host", f"ws://127.0.0.1:{node.port}", "--csv", str(tmp_path / "locust"),
         "BigRoomSubscriber", "BigRoomPublisher"],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with (tmp_path / "locust_stats.csv").open() as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    fanout = rows[("FANOUT", "big-room")]
    assert int(fanout["Request Count"]) > 0
    assert int(rows[("WS", "publish")]["Request Count"]) > 0
    assert all(int(row["Failure Count"]) == 0 for row in rows.values())

