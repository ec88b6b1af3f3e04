"""``batch`` without ``--ray``: one model in this process, batch after batch, the same rows out as on Ray."""

from __future__ import annotations

from collections.abc import Callable

from qwenvl_edge.batch.answer import Answerer, ModelSpec

Sink = Callable[[list[dict]], None]


def run_local(jobs: list[dict], spec: ModelSpec, batch_size: int, sink: Sink) -> None:
    """Answer ``jobs`` (``{"id", "images", "question"}``) in order; ``sink`` gets each finished batch's rows."""
    answerer = Answerer(spec)
    try:
        for start in range(0, len(jobs), batch_size):
            sink(answerer.answer(jobs[start:start + batch_size]))
    finally:
        answerer.close()
