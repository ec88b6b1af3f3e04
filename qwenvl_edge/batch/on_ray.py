"""``batch --ray``: Ray Data's actor pool, each actor one model copy (``Answerer``) that opens the bundle once and
answers batches of rows; the driver (this process) writes each finished batch to OUT as it comes back.

The only module of the project that imports ray (tests/test_layering.py holds that). Failures:

- a row that fails is an error row (``Answerer``), never a failed task;
- an actor that dies (killed, out of memory, a crash in a native library) is restarted and its batch run again,
  up to ``RETRIES`` times each (``max_restarts`` / ``max_task_retries``); a batch whose answer never came back
  was never written, so no row is lost or written twice;
- a worker whose bundle fails its sha256 check stops the job with one line naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Any

from qwenvl_edge.batch.answer import Answerer, ModelSpec
from qwenvl_edge.batch.local import Sink
from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.options import ENV_THREADS

RETRIES = 3  # restarts of a dead actor, and runs of the batch it held: a crash that repeats stops the job


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise QwenVLError("--ray needs Ray Data: pip install 'qwenvl-edge[ray]'") from None
    return ray


class RayAnswerer:
    """The callable class of ``map_batches``: one ``Answerer`` per actor. ``SPEC`` is set on a subclass made
    for the job (``answerer_class``), so no constructor argument sits in the object store, where a restarted
    actor could not find it again."""

    SPEC: dict[str, Any] = {}

    def __init__(self) -> None:
        self.answerer = Answerer(ModelSpec(**self.SPEC))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        rows = [{"id": str(ident), "images": [str(image) for image in images], "question": str(question)}
                for ident, images, question in zip(batch["id"], batch["images"], batch["question"], strict=True)]
        n, fatal = len(rows), self.answerer.fatal
        if fatal:  # a value, not an exception: Ray would retry the batch, and print its traceback on the way
            return {"row": [""] * n, "fatal": [fatal] * n}
        return {"row": [json.dumps(row) for row in self.answerer.answer(rows)], "fatal": [""] * n}


def answerer_class(spec: ModelSpec) -> type:
    return type("BundleAnswerer", (RayAnswerer,), {"SPEC": dict(vars(spec))})


def connect(ray: Any, address: str, verbose: bool) -> bool:
    """Join the cluster (``auto``: this machine's, else a new local one); True when this call started Ray."""
    if ray.is_initialized():  # a caller (a test, a notebook) joined one already
        return False
    quiet = {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose}
    if not verbose:  # Ray's C++ side logs to stderr itself (e.g. a note on every actor pool's arguments)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        if address == "auto":
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:
                ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise QwenVLError(f"--ray {address}: cannot join the Ray cluster ({first_line(e)})") from None
    return True


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def pool_size(ray: Any, actors: int | None, threads: int, batches: int) -> int:
    """``--actors``, else as many copies as the cluster's CPUs hold at ``threads`` each; never more copies than
    batches (a copy without a batch would load the model for nothing)."""
    return min(actors or max(1, int(ray.cluster_resources().get("CPU", 1) // threads)), batches)


def run_on_ray(jobs: list[dict], spec: ModelSpec, batch_size: int, sink: Sink, address: str,
               actors: int | None, verbose: bool) -> None:
    """Answer ``jobs`` on the cluster; ``sink`` gets each batch's rows as it comes back (in any order)."""
    ray = import_ray()
    started = connect(ray, address, verbose)
    try:
        _run(ray, jobs, spec, batch_size, sink, actors, verbose)
    finally:
        if started:
            ray.shutdown()


def _run(ray: Any, jobs: list[dict], spec: ModelSpec, batch_size: int, sink: Sink, actors: int | None,
         verbose: bool) -> None:
    threads = spec.n_threads or 1
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command prints its own: rows done and rows per second
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.CRITICAL)  # our one line says it
    batches = math.ceil(len(jobs) / batch_size)
    data = ray.data.from_items(jobs, override_num_blocks=batches)
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")  # Ray's deprecation and tuning notes; -v shows them
        answers = data.map_batches(  # max_restarts / max_task_retries: no named parameter yet in Ray 2.60
            answerer_class(spec), batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool_size(ray, actors, threads, batches)), num_cpus=threads,
            runtime_env={"env_vars": {ENV_THREADS: str(threads), "OMP_NUM_THREADS": str(threads)}},
            max_restarts=RETRIES, max_task_retries=RETRIES)
        _collect(ray, answers, sink)


def _collect(ray: Any, answers: Any, sink: Sink) -> None:
    """Each batch's rows into ``sink`` as it comes back; a worker's fatal line or Ray's failure as one line."""
    try:
        for block in answers.iter_batches(batch_size=None, batch_format="numpy"):
            fatal = [text for text in block["fatal"] if text]
            if fatal:
                raise QwenVLError(str(fatal[0]))
            sink([json.loads(text) for text in block["row"]])
    except ray.exceptions.RayError as e:
        raise QwenVLError(f"the Ray job failed: {first_line(e)} (rows answered so far are in OUT; rerun to "
                          "go on)") from None

