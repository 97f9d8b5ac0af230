"""Turning run results into what a reader sees: percentiles, aligned tables, ratios, a plot.

A run result is the dict bench.run_one returns (and the JSON file holds); everything here reads
those dicts and returns text, so the table printed is exactly the table in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Run = dict[str, Any]
#: One subscriber count's runs: roomcast (the target), the reference, socket.io (either may be
#: None).
Point = tuple[Run, Run | None, Run | None]

GENERATOR_LIMIT = 90.0  # Percent of one core above which a load-generator process is the limit.


def percentiles(samples_us: Sequence[int]) -> dict[str, float | None]:
    """p50, p95, p99, max and mean in milliseconds (nearest rank); None without samples."""
    if not samples_us:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(samples_us)
    n = len(ordered)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * n) - 1)] / 1000

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": ordered[-1] / 1000,
            "mean": sum(ordered) / n / 1000}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(target: Run, other: Run) -> dict[str, float | None]:
    """roomcast / ``other`` (the reference, or socket.io) for the headline figures.

    An --acked run: acked publishes per second and per server CPU-second, ack p99 latency.
    """
    if target.get("mode") == "acked":
        return {
            "acked_per_s": ratio(target["acked_per_s"], other["acked_per_s"]),
            "acked_per_cpu_s": ratio(target["server"]["acked_per_cpu_s"],
                                     other["server"]["acked_per_cpu_s"]),
            "ack_p99_ms": ratio(target["ack_latency_ms"]["p99"], other["ack_latency_ms"]["p99"]),
        }
    return {
        "deliveries_per_cpu_s": ratio(target["server"]["deliveries_per_cpu_s"],
                                      other["server"]["deliveries_per_cpu_s"]),
        "p99_ms": ratio(target["latency_ms"]["p99"], other["latency_ms"]["p99"]),
        "idle_kib_per_conn": ratio(target["idle"]["kib_per_conn"],
                                   other["idle"]["kib_per_conn"]),
        "connect_s": ratio(target.get("connect_s"), other.get("connect_s")),
    }


# --- formatting ---------------------------------------------------------------------------------


def num(value: float | int | None, digits: int = 0) -> str:
    """A number with thousands separators, or 'n/a'."""
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(cell).rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _connected(run: Run) -> str:
    return f"{run['connected']:,}" + (f" ({run['connect_failed']} failed)"
                                      if run["connect_failed"] else "")


def _column(run: Run) -> list[str]:
    lat = run["latency_ms"]
    srv = run["server"]
    gen = run["generator"]
    rss = srv["peak_rss_kib"]
    return [
        _connected(run),
        num(run.get("connect_s"), 2),
        num(run.get("connect_listen_overflows")),
        f"{num(run['delivered'])} / {num(run['expected'])}",
        f"{num(run['lost'])} / {num(run['duplicated'])}",
        num(run["deliveries_per_s"]),
        num(lat["p50"], 2), num(lat["p95"], 2), num(lat["p99"], 2), num(lat["max"], 2),
        f"{num(srv['cpu_s'], 2)} ({num(srv.get('user_s'), 2)} / {num(srv.get('sys_s'), 2)})",
        num(srv["deliveries_per_cpu_s"]),
        num(None if rss is None else rss / 1024, 1),
        num(run["idle"]["kib_per_conn"], 1),
        f"{num(gen['max_core_pct'])}%",
        num(run["machine"]["other_cores"], 2),
    ]


METRICS = [
    "subscribers connected",
    "connect + join s",
    "connect SYNs dropped",
    "deliveries / expected",
    "lost / duplicated",
    "deliveries/s",
    "fan-out latency p50 ms",
    "fan-out latency p95 ms",
    "fan-out latency p99 ms",
    "fan-out latency max ms",
    "server CPU s (user / sys)",
    "deliveries per server CPU-s",
    "server peak RSS MiB",
    "idle memory KiB/conn",
    "load generator busiest proc",
    "other processes' load, cores",
]


def _others(reference: Run | None, socketio: Run | None) -> list[tuple[str, Run]]:
    """The comparison runs present, with the name of their ratio column."""
    named = [("reference", reference), ("socket.io", socketio)]
    return [(name, run) for name, run in named if run is not None]


def summary(target: Run, reference: Run | None, socketio: Run | None = None) -> str:
    """The end-of-run table for one configuration, with ratios and warnings below it.

    One column per server run, then one ratio column per comparison (roomcast/reference,
    roomcast/socket.io).
    """
    cfg = target["config"]
    mode = "saturate" if cfg["saturate"] else f"latency, {cfg['rate']:g}/s"
    title = (f"== {target['target']}: S={cfg['subscribers']} subscribers, R={cfg['rooms']} "
             f"room(s), M={cfg['messages']} messages ({mode})")
    others = _others(reference, socketio)
    runs = [target] + [run for _, run in others]
    headers = ["metric", *(run["target"] for run in runs)]
    columns = [_column(run) for run in runs]
    rows = [[metric, *(col[i] for col in columns)] for i, metric in enumerate(METRICS)]
    lines = []
    for name, other in others:
        headers.append(f"roomcast/{name}")
        r = ratios(target, other)
        marks = {"connect + join s": times(r["connect_s"]),
                 "fan-out latency p99 ms": times(r["p99_ms"]),
                 "deliveries per server CPU-s": times(r["deliveries_per_cpu_s"]),
                 "idle memory KiB/conn": times(r["idle_kib_per_conn"])}
        for row in rows:
            row.append(marks.get(row[0], ""))
        lines.append(
            f"ratio roomcast/{name}: deliveries per server CPU-s "
            f"{times(r['deliveries_per_cpu_s'])} (higher is better), p99 latency "
            f"{times(r['p99_ms'])}, idle KiB/conn {times(r['idle_kib_per_conn'])}, "
            f"connect + join {times(r['connect_s'])} (lower is better)"
        )
    lines[:0] = [title, table(headers, rows)]
    if cfg["saturate"]:
        lines.append("saturate mode: all M messages are sent at once, so latency includes the "
                     "queue behind them; read deliveries per server CPU-s")
    for run in runs:
        lines.extend(f"WARNING: {run['target']}: {w}" for w in run["warnings"])
    return "\n".join(lines)


ACKED_METRICS = [
    "members connected",
    "connect + join s",
    "publishes sent",
    "acked / refused / unanswered",
    "acked publishes/s",
    "acks out of request order",
    "ack latency p50 ms",
    "ack latency p99 ms",
    "member deliveries / expected",
    "member lost / duplicated",
    "member out of order",
    "member latency p50 ms",
    "member latency p99 ms",
    "server CPU s (user / sys)",
    "acked publishes per server CPU-s",
    "server peak RSS MiB",
    "load generator busiest proc",
    "other processes' load, cores",
]


def _acked_column(run: Run) -> list[str]:
    srv = run["server"]
    rss = srv["peak_rss_kib"]
    lat = run["latency_ms"]
    ack = run["ack_latency_ms"]
    return [
        _connected(run),
        num(run["connect_s"], 2),
        num(run["sent"]),
        f"{num(run['acked'])} / {num(run['refused'])} / {num(run['unanswered'])}",
        num(run["acked_per_s"]),
        num(run["acks_out_of_order"]),
        num(ack["p50"], 2), num(ack["p99"], 2),
        f"{num(run['delivered'])} / {num(run['expected'])}",
        f"{num(run['lost'])} / {num(run['duplicated'])}",
        num(run["out_of_order"]),
        num(lat["p50"], 2), num(lat["p99"], 2),
        f"{num(srv['cpu_s'], 2)} ({num(srv.get('user_s'), 2)} / {num(srv.get('sys_s'), 2)})",
        num(srv["acked_per_cpu_s"]),
        num(None if rss is None else rss / 1024, 1),
        f"{num(run['generator']['max_core_pct'])}%",
        num(run["machine"]["other_cores"], 2),
    ]


def acked_summary(target: Run, socketio: Run | None = None) -> str:
    """The --acked table: one publisher's acknowledged publishes, and what the members got."""
    cfg = target["config"]
    title = (f"== {target['target']} --acked: M={cfg['messages']} publishes, window "
             f"{cfg['window']}, {cfg['subscribers']} member(s) on "
             f"{', '.join(target['member_urls'])}, publisher on {target['publish_url']}")
    runs = [target] + ([socketio] if socketio else [])
    headers = ["metric", *(run["target"] for run in runs)]
    columns = [_acked_column(run) for run in runs]
    rows = [[metric, *(col[i] for col in columns)] for i, metric in enumerate(ACKED_METRICS)]
    lines = []
    if socketio is not None:
        headers.append("roomcast/socket.io")
        r = ratios(target, socketio)
        marks = {"acked publishes/s": times(r["acked_per_s"]),
                 "ack latency p99 ms": times(r["ack_p99_ms"]),
                 "acked publishes per server CPU-s": times(r["acked_per_cpu_s"])}
        for row in rows:
            row.append(marks.get(row[0], ""))
        lines.append("socket.io acknowledges once its process emitted (its Redis adapter "
                     "publishes without waiting); roomcast once the message is published")
    lines[:0] = [title, table(headers, rows)]
    for run in runs:
        lines.extend(f"WARNING: {run['target']}: {w}" for w in run["warnings"])
    return "\n".join(lines)


def sweep_table(points: Sequence[Point]) -> str:
    """One row per subscriber count: the target's figures, the reference's and socket.io's."""
    with_sio = any(sio is not None for _, _, sio in points)
    headers = ["S", "target", "connect s", "deliveries/s", "p50 ms", "p95 ms", "p99 ms",
               "max ms", "deliv/CPU-s", "lost", "ref connect s", "ref p99 ms",
               "ref deliv/CPU-s"]
    if with_sio:
        headers += ["sio connect s", "sio p99 ms", "sio deliv/CPU-s"]
    headers += ["gen busiest", "other load"]
    rows = []
    for target, ref, sio in points:
        lat = target["latency_ms"]
        row = [
            str(target["config"]["subscribers"]), target["target"],
            num(target.get("connect_s"), 2),
            num(target["deliveries_per_s"]), num(lat["p50"], 2), num(lat["p95"], 2),
            num(lat["p99"], 2), num(lat["max"], 2),
            num(target["server"]["deliveries_per_cpu_s"]), num(target["lost"]),
        ]
        for other, wanted in ((ref, True), (sio, with_sio)):
            if not wanted:
                continue
            row += ([num(other.get("connect_s"), 2), num(other["latency_ms"]["p99"], 2),
                     num(other["server"]["deliveries_per_cpu_s"])] if other else ["-"] * 3)
        row += [f"{num(target['generator']['max_core_pct'])}%",
                num(target["machine"]["other_cores"], 2)]
        rows.append(row)
    return table(headers, rows)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def plot_sweep(points: Sequence[Point], path: Path) -> None:
    """Latency percentiles and throughput against S: roomcast solid, the reference dashed,
    socket.io dotted (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [t["config"]["subscribers"] for t, _, _ in points]
    refs = [r for _, r, _ in points if r is not None]
    sios = [s for _, _, s in points if s is not None]
    fig, (lat_ax, thr_ax) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    label = points[0][0]["target"]
    for key, color in (("p50", "tab:blue"), ("p95", "tab:orange"), ("p99", "tab:red")):
        lat_ax.plot(xs, [_nan(t["latency_ms"][key]) for t, _, _ in points], "o-", color=color,
                    label=f"{label} {key}")
        if len(refs) == len(points):
            lat_ax.plot(xs, [_nan(r["latency_ms"][key]) for r in refs], "s--", color=color,
                        alpha=0.6, label=f"reference {key}")
        if len(sios) == len(points):
            lat_ax.plot(xs, [_nan(s["latency_ms"][key]) for s in sios], "^:", color=color,
                        alpha=0.6, label=f"socket.io {key}")
    lat_ax.set(xlabel="subscribers (S)", ylabel="fan-out latency, ms",
               title="latency percentiles")
    lat_ax.legend(fontsize=7)
    lat_ax.grid(alpha=0.3)
    thr_ax.plot(xs, [_nan(t["deliveries_per_s"]) for t, _, _ in points], "o-",
                color="tab:green", label=f"{label} deliveries/s")
    thr_ax.plot(xs, [_nan(t["server"]["deliveries_per_cpu_s"]) for t, _, _ in points], "o-",
                color="tab:purple", label=f"{label} deliveries per server CPU-s")
    if len(refs) == len(points):
        thr_ax.plot(xs, [_nan(r["deliveries_per_s"]) for r in refs], "s--", color="tab:green",
                    alpha=0.6, label="reference deliveries/s")
        thr_ax.plot(xs, [_nan(r["server"]["deliveries_per_cpu_s"]) for r in refs], "s--",
                    color="tab:purple", alpha=0.6, label="reference deliveries per CPU-s")
    if len(sios) == len(points):
        thr_ax.plot(xs, [_nan(s["deliveries_per_s"]) for s in sios], "^:", color="tab:green",
                    alpha=0.6, label="socket.io deliveries/s")
        thr_ax.plot(xs, [_nan(s["server"]["deliveries_per_cpu_s"]) for s in sios], "^:",
                    color="tab:purple", alpha=0.6, label="socket.io deliveries per CPU-s")
    thr_ax.set(xlabel="subscribers (S)", ylabel="deliveries per second",
               title="throughput")
    thr_ax.legend(fontsize=7)
    thr_ax.grid(alpha=0.3)
    cfg = points[0][0]["config"]
    load = "saturate" if cfg["saturate"] else f"{cfg['rate']:g} msg/s"
    versus = " and socket.io" if sios else ""
    fig.suptitle(f"{label} vs reference{versus}: R={cfg['rooms']}, M={cfg['messages']} at "
                 f"{load}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, pil_kwargs={"optimize": True})
    plt.close(fig)
