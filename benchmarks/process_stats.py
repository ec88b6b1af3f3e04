"""Run a command and measure it: wall time, peak RSS (``wait4``), and an RSS timeline.

Each benchmark stage runs in its own process so its peak RSS is its own, not the maximum of
everything the benchmark did before.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ProcessStats:
    wall_s: float
    peak_rss_bytes: int
    returncode: int
    stdout: str
    stderr_lines: list[tuple[float, str]]  # (seconds since start, line)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)

    def peak_rss_between(self, start: float, end: float) -> int:
        inside = [rss for t, rss in self.rss_samples if start <= t <= end]
        return max(inside, default=0)


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], sample_every: float = 0.25, env: dict | None = None) -> ProcessStats:
    """Run ``cmd`` to the end; stderr lines are time-stamped as they arrive."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    samples: list[tuple[float, int]] = []
    lines: list[tuple[float, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic() - started, _rss_bytes(proc.pid)))
            done.wait(sample_every)

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for t in threads:
        t.start()
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    done.set()
    for t in threads:
        t.join(timeout=5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ProcessStats(wall, usage.ru_maxrss * 1024, proc.returncode, stdout, lines, samples)
