"""``qwenvl-edge batch --ray`` throughput: rows per second with 1 and 2 actors on this machine, as a ratio.

The tiny trained bundle (built once under --work, as ``qwenvl-edge demo`` builds it) answers the task images
(colour, sign, grounding; greedy, no disk cache) on a Ray cluster started for each run on this machine
(``--ray auto`` with no cluster running; ``--address`` to use one). For each pool size it records:

- ``rows_per_s``: steady state, from the first finished batch to the last (the actors' start and model load,
  paid once per job, left out), and ``rows_per_s_wall``: the whole job, Ray's start included;
- the one-process run (``batch`` without ``--ray``, the same threads per model) as the baseline of the same run.

The load average at the start is recorded: on a shared machine the ratio means little. Writes ``batch_ray``
(and the flat ``batch_*`` keys) into benchmarks/results.json; RESULTS.md is not regenerated::

    python -m benchmarks.bench_batch [--rows 120] [--threads-per-actor 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from qwenvl_edge.batch.answer import ModelSpec
from qwenvl_edge.evaluation import task_images

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 24
BATCH_SIZE = 4
SEED = 11  # task images the training never saw


def task_jobs(folder: Path, n: int) -> list[dict]:
    """``n`` rows over the three tasks, each its own image (no image is answered twice, so no row is cached)."""
    folder.mkdir(parents=True, exist_ok=True)
    per_task = {task: task_images.make_set(task, n // 3 + 1, SEED) for task in task_images.TASKS}
    jobs = []
    for k in range(n):
        sample = per_task[task_images.TASKS[k % 3]][k // 3]
        path = folder / f"img{k:04d}.png"
        sample.image.save(path)
        jobs.append({"id": str(k), "images": [str(path)], "question": sample.question})
    return jobs


class Clock:
    """The ``sink`` of a runner: counts rows and stamps each finished batch."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.stamps: list[tuple[float, int]] = []
        self.errors = 0

    def __call__(self, rows: list[dict]) -> None:
        self.errors += sum("error" in row for row in rows)
        self.stamps.append((time.monotonic(), len(rows)))

    def figures(self) -> dict:
        rows = sum(n for _, n in self.stamps)
        first, last = self.stamps[0][0], self.stamps[-1][0]
        steady = rows - self.stamps[0][1]
        return {"rows": rows, "errors": self.errors, "wall_s": last - self.started,
                "rows_per_s_wall": rows / (last - self.started),
                "rows_per_s": steady / (last - first) if last > first else None}


def measure(jobs: list[dict], spec: ModelSpec, actors: int | None, address: str) -> dict:
    """One job: on Ray with ``actors`` copies, or in this process (``actors=None``)."""
    clock = Clock()
    if actors is None:
        from qwenvl_edge.batch.local import run_local

        run_local(jobs, spec, BATCH_SIZE, clock)
    else:
        from qwenvl_edge.batch.on_ray import run_on_ray

        run_on_ray(jobs, spec, BATCH_SIZE, clock, address, actors, verbose=False)
    return clock.figures()


def tiny_bundle(work: Path) -> Path:
    from qwenvl_edge.cli.commands import _demo_bundle

    return _demo_bundle(work, "Q4_K_M", rebuild=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=120, help="rows per job (default: 120)")
    ap.add_argument("--threads-per-actor", type=int, default=1, help="threads of each model copy (default: 1)")
    ap.add_argument("--address", default="auto", help="the Ray cluster (default: auto, a new one on this machine)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwenvl-bench-batch"),
                    help="where the tiny bundle and the images go")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results.json")
    a = ap.parse_args(argv)
    load_at_start = os.getloadavg()
    bundle = tiny_bundle(a.work)
    jobs = task_jobs(a.work / "images", a.rows)
    spec = ModelSpec(bundle=str(bundle.absolute()), n_threads=a.threads_per_actor, n_ctx=2048, use_cache=False,
                     load="read", max_tokens=MAX_TOKENS, temperature=0.0, top_p=None, seed=0)
    runs = {"one_process": measure(jobs, spec, None, a.address)}
    for actors in (1, 2):
        runs[f"ray_{actors}_actor{'s' if actors > 1 else ''}"] = measure(jobs, spec, actors, a.address)
    one, two = runs["ray_1_actor"]["rows_per_s"], runs["ray_2_actors"]["rows_per_s"]
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average_at_start": load_at_start,
           "rows": a.rows, "batch_size": BATCH_SIZE, "max_tokens": MAX_TOKENS,
           "threads_per_actor": a.threads_per_actor, "runs": runs,
           "ratio_2_vs_1_actor": two / one if one and two else None}
    print(json.dumps(out, indent=2))
    results = json.loads(a.results.read_text()) if a.results.is_file() else {}
    results["batch_ray"] = out
    results.update({"batch_rows_per_s_1_actor": one, "batch_rows_per_s_2_actors": two,
                    "batch_ratio_2_vs_1_actor": out["ratio_2_vs_1_actor"],
                    "batch_load_average_at_start": load_at_start[0]})
    a.results.write_text(json.dumps(results, indent=2) + "\n")
    (a.results.parent / "batch.md").write_text(section(out))
    return 0


def section(out: dict) -> str:
    """benchmarks/batch.md, which report.py copies into RESULTS.md."""
    lines = ["## `qwenvl-edge batch`: rows per second, one machine (the tiny trained bundle)", "",
             f"{out['rows']} task images (greedy, at most {out['max_tokens']} tokens, no disk cache), batches of "
             f"{out['batch_size']}, {out['threads_per_actor']} thread(s) per model, {out['machine']}; load average "
             f"at the start {out['load_average_at_start'][0]:.2f}. Steady state: from the first finished batch to "
             "the last (the actors' start and model load left out); wall: the whole job, Ray's start included.", "",
             "| run | rows/s (steady) | rows/s (wall) | wall |", "| --- | --- | --- | --- |"]
    for name, r in out["runs"].items():
        lines.append(f"| {name.replace('_', ' ')} | {r['rows_per_s']:.2f} | {r['rows_per_s_wall']:.2f} | "
                     f"{r['wall_s']:.1f} s |")
    ratio = out["ratio_2_vs_1_actor"]
    lines += ["", f"2 actors / 1 actor: **x{ratio:.2f}** (steady state) on 2 cores." if ratio else ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
