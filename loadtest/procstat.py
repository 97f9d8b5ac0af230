"""Process and machine figures read from /proc (Linux): CPU seconds, RSS, peak RSS, the CPU model.

CPU time is utime + stime of /proc/PID/stat (proc(5): fields 14 and 15, in clock ticks), so a
delta over a phase is the CPU the process spent in it, whatever else ran on the machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds used by ``pid`` so far; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds used by ``pid`` so far; None when it is gone."""
    times = cpu_times(pid)
    return None if times is None else times[0] + times[1]


def status_line(path: str, key: str) -> int | None:
    """The number on the ``key:`` line of a /proc file (kB units); None when absent."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def listen_overflows() -> int | None:
    """Connections the kernel dropped since boot because a listen backlog was full (TcpExt
    ListenOverflows in /proc/net/netstat: each one a SYN the client sends again after 1 s or
    more); None where there is no such counter."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(row["ListenOverflows"]) if "ListenOverflows" in row else None
    return None


def rss_kib(pid: int) -> int | None:
    """Resident memory now (VmRSS)."""
    return status_line(f"/proc/{pid}/status", "VmRSS")


def peak_rss_kib(pid: int) -> int | None:
    """Peak resident memory since the process started (VmHWM)."""
    return status_line(f"/proc/{pid}/status", "VmHWM")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What a reader needs to judge the figures: cores, CPU model, memory, kernel, Python."""
    mem = status_line("/proc/meminfo", "MemTotal")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "mem_total_mib": mem // 1024 if mem else None,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
    }



def machine_cpu() -> dict[str, float]:
    """Seconds every CPU together spent so far (the ``cpu`` line of /proc/stat, proc(5)).

    ``tasks``: user + nice + system, the time charged to processes; ``irq``: hard and soft
    interrupts (loopback TCP delivery runs as softirq, charged to no process when the kernel
    accounts IRQ time separately); ``steal``: time the hypervisor gave to other guests.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return {"tasks": 0.0, "irq": 0.0, "steal": 0.0}
    fields += [0] * (8 - len(fields))
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return {"tasks": (user + nice + system) / CLOCK_TICKS,
            "irq": (irq + softirq) / CLOCK_TICKS, "steal": steal / CLOCK_TICKS}


def code_version(root: Path | None = None) -> dict[str, Any]:
    """The git commit of the code measured, and which files under node/ differ from it.

    Figures are only comparable between runs of the same code; None when git is unavailable.
    """
    root = root or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=5).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "node"], cwd=root,
                                capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "node_changes": None}
    changed = sorted(line[3:] for line in status.splitlines() if line.strip())
    return {"commit": commit or None, "node_changes": changed}
