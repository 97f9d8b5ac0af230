"""The load tools: the bench's wire codec and figures, a tiny real bench, a short Locust run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import report, wire
from roomcast.cli import build_parser
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
    for flag in ("--target", "--saturate", "--sweep", "--max-seconds", "--no-reference"):
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
    assert point["target"]["target"] == "roomcast-embedded"
    assert "ratio roomcast/reference" in proc.stdout
    assert "fan-out latency p99 ms" in proc.stdout


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

