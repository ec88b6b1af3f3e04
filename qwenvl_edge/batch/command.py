"""``qwenvl-edge batch IN OUT``: every input row answered into OUT, resumably, here or over Ray (``--ray``).

Order of work: options, IN (every row checked, ids unique), OUT (readable, ours), then the rows OUT lacks:
the bad ones are written as error rows at once, the others answered batch by batch. Exit code 2 when any row
of IN has an error row in OUT (this run's or an earlier one's), so a rerun never reports a clean job that is not.
"""

from __future__ import annotations

import argparse
import sys
import time

from qwenvl_edge.batch.answer import ModelSpec
from qwenvl_edge.batch.output import open_output
from qwenvl_edge.batch.rows import Row, read_rows
from qwenvl_edge.cli.common import check_model_options, sampling
from qwenvl_edge.errors import OptionError, QwenVLError


class Progress:
    """``batch: 120/400 rows (80 this run, 3.1 rows/s)`` on stderr after each batch; one redrawn line on a
    terminal; nothing with ``-q``."""

    def __init__(self, total: int, already: int, quiet: bool, stream=None):
        self.total, self.done, self.quiet = total, already, quiet
        self.stream = stream or sys.stderr
        self.started, self.this_run = time.monotonic(), 0

    def add(self, n: int) -> None:
        self.done += n
        self.this_run += n
        if self.quiet:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        line = (f"batch: {self.done}/{self.total} rows ({self.this_run} this run, "
                f"{self.this_run / elapsed:.2f} rows/s)")
        tty = self.stream.isatty()
        end = "\n" if not tty or self.done == self.total else ""
        self.stream.write(("\r\033[K" if tty else "") + line + end)
        self.stream.flush()

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)


def check_batch_options(a: argparse.Namespace) -> None:
    if a.actors is not None and a.ray is None:
        raise OptionError("--actors needs --ray (without it one model answers in this process)")
    check_model_options(a)


def model_spec(a: argparse.Namespace) -> ModelSpec:
    from qwenvl_edge.paths import default_bundle_dir

    bundle = (a.bundle if a.bundle is not None else default_bundle_dir()).expanduser().absolute()
    threads = a.threads_per_actor if a.threads_per_actor is not None or a.ray is None else 1
    s = sampling(a)
    return ModelSpec(bundle=str(bundle), n_threads=threads, n_ctx=a.n_ctx, use_cache=not a.no_cache, load=a.load,
                     max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"], seed=a.seed)


def job(row: Row) -> dict:
    return {"id": row.id, "images": row.job.images, "question": row.job.question}


def cmd_batch(a: argparse.Namespace) -> int:
    check_batch_options(a)
    rows = read_rows(a.input)
    out = open_output(a.output, a.input)
    done = out.done()
    todo = [row for row in rows if row.id not in done]
    progress = Progress(len(rows), len(rows) - len(todo), a.quiet)
    if len(todo) < len(rows):
        progress.say(f"batch: {len(rows) - len(todo)} of {len(rows)} rows are in {a.output} already: skipped")
    failed = sum(1 for row in rows if done.get(row.id))

    def sink(answers: list[dict]) -> None:
        nonlocal failed
        out.append(answers)
        failed += sum("error" in answer for answer in answers)
        progress.add(len(answers))

    bad = [{"id": row.id, "error": row.error} for row in todo if row.job is None]
    if bad:
        sink(bad)
    jobs = [job(row) for row in todo if row.job is not None]
    if jobs:
        _answer(a, jobs, sink)
    if failed:
        raise QwenVLError(f"{failed} of {len(rows)} rows failed (their rows in {a.output} hold an \"error\"; "
                          "remove those rows and rerun to try them again)")
    progress.say(f"batch: {len(rows)} rows answered into {a.output}")
    return 0


def _answer(a: argparse.Namespace, jobs: list[dict], sink) -> None:
    spec = model_spec(a)
    if a.ray is None:
        from qwenvl_edge.batch.local import run_local

        run_local(jobs, spec, a.batch_size, sink)
    else:
        from qwenvl_edge.batch.on_ray import run_on_ray

        run_on_ray(jobs, spec, a.batch_size, sink, a.ray, a.actors, a.verbose)
