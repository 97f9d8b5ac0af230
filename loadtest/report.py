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


def ratios(target: Run, reference: Run) -> dict[str, float | None]:
    """roomcast / reference for the three headline figures."""
    return {
        "deliveries_per_cpu_s": ratio(target["server"]["deliveries_per_cpu_s"],
                                      reference["server"]["deliveries_per_cpu_s"]),
        "p99_ms": ratio(target["latency_ms"]["p99"], reference["latency_ms"]["p99"]),
        "idle_kib_per_conn": ratio(target["idle"]["kib_per_conn"],
                                   reference["idle"]["kib_per_conn"]),
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


def _column(run: Run) -> list[str]:
    lat = run["latency_ms"]
    srv = run["server"]
    gen = run["generator"]
    rss = srv["peak_rss_kib"]
    return [
        f"{run['connected']:,}" + (f" ({run['connect_failed']} failed)"
                                   if run["connect_failed"] else ""),
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


def summary(target: Run, reference: Run | None) -> str:
    """The end-of-run table for one configuration, with ratios and warnings below it."""
    cfg = target["config"]
    mode = "saturate" if cfg["saturate"] else f"latency, {cfg['rate']:g}/s"
    title = (f"== {target['target']}: S={cfg['subscribers']} subscribers, R={cfg['rooms']} "
             f"room(s), M={cfg['messages']} messages ({mode})")
    runs = [target] + ([reference] if reference else [])
    headers = ["metric", *(run["target"] for run in runs)]
    columns = [_column(run) for run in runs]
    rows = [[metric, *(col[i] for col in columns)] for i, metric in enumerate(METRICS)]
    if reference is not None:
        headers.append("roomcast/reference")
        r = ratios(target, reference)
        marks = {"fan-out latency p99 ms": times(r["p99_ms"]),
                 "deliveries per server CPU-s": times(r["deliveries_per_cpu_s"]),
                 "idle memory KiB/conn": times(r["idle_kib_per_conn"])}
        for row in rows:
            row.append(marks.get(row[0], ""))
    lines = [title, table(headers, rows)]
    if reference is not None:
        r = ratios(target, reference)
        lines.append(
            "ratio roomcast/reference: deliveries per server CPU-s "
            f"{times(r['deliveries_per_cpu_s'])} (higher is better), p99 latency "
            f"{times(r['p99_ms'])}, idle KiB/conn {times(r['idle_kib_per_conn'])} "
            "(lower is better)"
        )
    if cfg["saturate"]:
        lines.append("saturate mode: all M messages are sent at once, so latency includes the "
                     "queue behind them; read deliveries per server CPU-s")
    for run in runs:
        lines.extend(f"WARNING: {run['target']}: {w}" for w in run["warnings"])
    return "\n".join(lines)


def sweep_table(points: Sequence[tuple[Run, Run | None]]) -> str:
    """One row per subscriber count: the target's figures and the reference's beside them."""
    headers = ["S", "target", "deliveries/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
               "deliv/CPU-s", "lost", "ref p99 ms", "ref deliv/CPU-s", "gen busiest",
               "other load"]
    rows = []
    for target, ref in points:
        lat = target["latency_ms"]
        rows.append([
            str(target["config"]["subscribers"]), target["target"],
            num(target["deliveries_per_s"]), num(lat["p50"], 2), num(lat["p95"], 2),
            num(lat["p99"], 2), num(lat["max"], 2),
            num(target["server"]["deliveries_per_cpu_s"]), num(target["lost"]),
            num(ref["latency_ms"]["p99"], 2) if ref else "-",
            num(ref["server"]["deliveries_per_cpu_s"]) if ref else "-",
            f"{num(target['generator']['max_core_pct'])}%",
            num(target["machine"]["other_cores"], 2),
        ])
    return table(headers, rows)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def plot_sweep(points: Sequence[tuple[Run, Run | None]], path: Path) -> None:
    """Latency percentiles and throughput against S, roomcast solid, reference dashed (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [t["config"]["subscribers"] for t, _ in points]
    refs = [r for _, r in points if r is not None]
    fig, (lat_ax, thr_ax) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    label = points[0][0]["target"]
    for key, color in (("p50", "tab:blue"), ("p95", "tab:orange"), ("p99", "tab:red")):
        lat_ax.plot(xs, [_nan(t["latency_ms"][key]) for t, _ in points], "o-", color=color,
                    label=f"{label} {key}")
        if len(refs) == len(points):
            lat_ax.plot(xs, [_nan(r["latency_ms"][key]) for r in refs], "s--", color=color,
                        alpha=0.6, label=f"reference {key}")
    lat_ax.set(xlabel="subscribers (S)", ylabel="fan-out latency, ms",
               title="latency percentiles")
    lat_ax.legend(fontsize=7)
    lat_ax.grid(alpha=0.3)
    thr_ax.plot(xs, [_nan(t["deliveries_per_s"]) for t, _ in points], "o-", color="tab:green",
                label=f"{label} deliveries/s")
    thr_ax.plot(xs, [_nan(t["server"]["deliveries_per_cpu_s"]) for t, _ in points], "o-",
                color="tab:purple", label=f"{label} deliveries per server CPU-s")
    if len(refs) == len(points):
        thr_ax.plot(xs, [_nan(r["deliveries_per_s"]) for r in refs], "s--", color="tab:green",
                    alpha=0.6, label="reference deliveries/s")
        thr_ax.plot(xs, [_nan(r["server"]["deliveries_per_cpu_s"]) for r in refs], "s--",
                    color="tab:purple", alpha=0.6, label="reference deliveries per CPU-s")
    thr_ax.set(xlabel="subscribers (S)", ylabel="deliveries per second",
               title="throughput")
    thr_ax.legend(fontsize=7)
    thr_ax.grid(alpha=0.3)
    cfg = points[0][0]["config"]
    load = "saturate" if cfg["saturate"] else f"{cfg['rate']:g} msg/s"
    fig.suptitle(f"{label} vs reference: R={cfg['rooms']}, M={cfg['messages']} at {load}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, pil_kwargs={"optimize": True})
    plt.close(fig)
