"""The export's overall progress: which stage, how far, time elapsed and time left.

Each stage reports its own ``k/n`` counts (blocks, pieces, tensors); this turns them into one
fraction of the whole export, weighting each stage by its expected cost (seconds per byte,
measured on the full-size export), and estimates the time left from the pace of the stages that
actually ran (a reused stage costs nothing). The lines go through the same ``progress`` callback
as the stages' own messages, so the CLI prints them in order.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

Progress = Callable[[str], None]
COUNT = re.compile(r"(\d+)/(\d+)")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class OverallProgress:
    """Wraps the stages' progress messages; adds an ``overall:`` line at each stage start and every ``every`` s."""

    def __init__(self, weights: dict[str, float], say: Progress, every: float = 15.0):
        self.weights = {k: max(v, 1e-9) for k, v in weights.items()}
        self.say = say
        self.every = every
        self.started = time.monotonic()
        self.done: dict[str, bool] = {}  # finished stage -> whether it actually ran (not reused)
        self.current: str | None = None
        self.fraction = 0.0
        self.stage_started = self.started
        self.worked_seconds = 0.0
        self.last_line = 0.0
        self.windows: dict[str, list[float]] = {}  # stage -> [start, end] seconds since the start

    def _total(self) -> float:
        return sum(self.weights.values())

    def overall_fraction(self) -> float:
        finished = sum(self.weights[s] for s in self.done)
        current = self.weights.get(self.current, 0.0) * self.fraction if self.current else 0.0
        return (finished + current) / self._total()

    def line(self) -> str:
        now = time.monotonic()
        worked_weight = sum(self.weights[s] for s, ran in self.done.items() if ran)
        worked_time = self.worked_seconds
        if self.current:
            worked_weight += self.weights[self.current] * self.fraction
            worked_time += now - self.stage_started
        remaining = self._total() * (1 - self.overall_fraction())
        left = f"~{_clock(worked_time / worked_weight * remaining)} left" if worked_weight > 0 and worked_time > 1 \
            else "time left: estimating"
        names = list(self.weights)
        where = f", stage {names.index(self.current) + 1} of {len(names)} ({self.current})" if self.current else ""
        elapsed = _clock(now - self.started)
        return f"overall: {100 * self.overall_fraction():.0f}% done{where}, {elapsed} elapsed, {left}"

    def start(self, name: str) -> Progress:
        """Begin stage ``name``; return the callback its code reports to."""
        self.current, self.fraction, self.stage_started = name, 0.0, time.monotonic()
        self.windows[name] = [round(self.stage_started - self.started, 3)]
        self._overall(force=True)

        def report(message: str) -> None:
            m = COUNT.search(message)
            if m and int(m.group(2)) > 0:
                self.fraction = min(1.0, int(m.group(1)) / int(m.group(2)))
            self.say(message)
            self._overall()
        return report

    def finish(self, name: str, ran: bool = True) -> None:
        now = time.monotonic()
        self.windows[name].append(round(now - self.started, 3))
        if ran:
            self.worked_seconds += now - self.stage_started
        self.done[name] = ran
        self.current, self.fraction = None, 0.0

    def _overall(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_line >= self.every:
            self.last_line = now
            self.say(self.line())
