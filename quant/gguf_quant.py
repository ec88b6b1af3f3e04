"""Quantize a finished float GGUF with llama.cpp's own quantizer, in a worker process.

The float file stays the reference; this is a separate pass over it. llama.cpp picks the
per-tensor types of a mix such as Q4_K_M itself (e.g. Q6_K for ``output.weight``) and falls
back to a type without 256-wide blocks for rows that k-quants cannot split. Its per-tensor log
lines are routed to this module's logger at DEBUG level (visible with ``-v``), and turned into
``progress`` messages, instead of going to stderr.

Why a worker process (``run_in_worker``): ``llama_model_quantize`` is one C call that runs for
minutes at full size, and Python runs a signal handler only when it returns; a KeyboardInterrupt
raised inside llama.cpp's log callback (a ctypes callback) is printed and ignored. The worker
runs in its own session (a terminal's Ctrl-C reaches only the parent); the parent waits on its
pipe, which a signal interrupts at once, and kills the worker before the interrupt unwinds, so
no C call is left writing. ``routed_llama_logs`` also keeps an exception raised in the callback
and raises it after the C call, for in-process callers.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import llama_cpp

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.quant.registry import DEFAULT_LLM_TYPE, LLM_FILE_TYPES

log = logging.getLogger(__name__)

# Names accepted by ``--llm`` (their list lives in ``registry``, stdlib only, for the CLI), and the llama.cpp
# file type each one asks for.
LLM_TYPES: dict[str, gguf.LlamaFileType] = {name: gguf.LlamaFileType[member]
                                            for name, member in LLM_FILE_TYPES.items()}

# llama.cpp logs one line per tensor: "[   3/  19]   blk.0.attn_qkv.weight - [ 256, 768, ...], type = ..."
# enum ggml_log_level in ggml.h (llama-cpp-python's _logger.py still has the older numbering)
GGML_LOG_LEVEL_INFO, GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 2, 4, 5
TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")

Progress = Callable[[str], None]


@contextmanager
def routed_llama_logs(on_line: Callable[[int, str], None]) -> Iterator[None]:
    """Send llama.cpp's log lines (ggml level, text) to ``on_line`` while the block runs, then restore the old sink."""
    old_callback = llama_cpp.llama_log_callback()
    old_data = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(old_callback), ctypes.byref(old_data))
    pending: list[str] = []
    line_level = [GGML_LOG_LEVEL_INFO]
    raised: list[BaseException] = []  # ctypes prints and drops what a callback raises: keep it for after

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        try:
            if level != GGML_LOG_LEVEL_CONT:
                line_level[0] = level
            pending.append(text.decode("utf-8", errors="replace"))
            if pending[-1].endswith("\n"):
                line, pending[:] = "".join(pending).rstrip("\n"), []
                on_line(line_level[0], line)
        except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt above all: re-raised after the C call)
            raised.append(e)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(old_callback, old_data)
    if raised:
        raise raised[0]


def _check_paths(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise QwenVLError(f"{src}: no such GGUF file to quantize")
    if dst.exists():
        raise QwenVLError(f"{dst}: already exists; remove it or choose another name")
    if not dst.parent.is_dir():
        raise QwenVLError(f"{dst.parent}: output folder does not exist")
    with src.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise QwenVLError(f"{src}: not a GGUF file")


def quantize_gguf(src: Path, dst: Path, llm_type: str = DEFAULT_LLM_TYPE, n_threads: int | None = None,
                  progress: Progress | None = None) -> None:
    """Write ``src`` quantized to ``llm_type`` (a key of ``LLM_TYPES``) as ``dst``, which must not exist.

    The result appears under ``dst`` only when llama.cpp has finished it.
    """
    if llm_type not in LLM_TYPES:
        raise QwenVLError(f"unknown LLM type {llm_type!r}; choose {', '.join(LLM_TYPES)}")
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    say = progress or (lambda _msg: None)
    ftype = LLM_TYPES[llm_type]
    nthread = n_threads if n_threads is not None else (os.cpu_count() or 1)
    t0 = time.perf_counter()
    say(f"quantizing {src.name} -> {dst.name} as {llm_type} ({ftype.name}, {nthread} threads)")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    try:
        job = {"src": str(src), "tmp": str(tmp), "ftype": int(ftype), "nthread": nthread, "type": llm_type}
        result = run_in_worker("quantize", job, say)
        if result["rc"] != 0:
            why = result["error"] or "run with -v for llama.cpp's log"
            raise QwenVLError(f"{src}: llama.cpp quantization to {llm_type} failed with code {result['rc']} ({why})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # the worker is dead by now: nothing writes it any more
    say(f"wrote {dst.name}: {llm_type}, {dst.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s")


WORKER_MODULE = "qwenvl_edge.quant.gguf_quant"


def run_in_worker(task: str, job: dict[str, Any], progress: Progress | None = None) -> Any:
    """Run ``task`` (a key of ``WORKER_TASKS``) on ``job`` in a worker process; return its result.

    The worker's ``progress`` lines are passed on as they come. On any exit from here (result,
    error, Ctrl-C, SIGTERM) the worker is dead before this returns: killed if still running.
    """
    say = progress or (lambda _m: None)
    job = {**job, "task": task, "parent": os.getpid(), "debug": log.isEnabledFor(logging.DEBUG)}
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        try:
            say(f"llama.cpp {task}: worker process {proc.pid}")
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
            reply = _read_replies(proc, say)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if "error" in reply:
            raise QwenVLError(str(reply["error"]))
        if rc != 0 or "result" not in reply:
            how = f"was killed by signal {-rc}" if rc < 0 else f"stopped with exit code {rc}"
            raise QwenVLError(f"the llama.cpp {task} worker {how} ({_last_line(stderr) or 'no message'})")
    return reply["result"]


def _read_replies(proc: subprocess.Popen, say: Progress) -> dict[str, Any]:
    """Pass the worker's progress lines on; return its last reply (``result`` or ``error``)."""
    reply: dict[str, Any] = {}
    for raw in proc.stdout:
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        if "progress" in message:
            say(str(message["progress"]))
        elif "log" in message:
            log.debug("llama.cpp: %s", message["log"])
        else:
            reply = message
    return reply


def _last_line(file: Any) -> str:
    file.seek(0)
    lines = [line.strip() for line in file.read()[-4096:].decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _quantize_task(job: dict[str, Any], say: Progress, debug: Callable[[str], None]) -> dict[str, Any]:
    """In the worker: ``llama_model_quantize`` into ``job["tmp"]``; its return code and last error line."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(job["ftype"])
    params.nthread = int(job["nthread"])
    t0 = time.perf_counter()
    errors: list[str] = []

    def on_line(level: int, line: str) -> None:
        debug(line)
        if level == GGML_LOG_LEVEL_ERROR:
            errors.append(line.strip())
        m = TENSOR_LINE.search(line)
        if m:
            say(f"quantized {job['type']} [{m[1]}/{m[2]}] {m[3]} ({time.perf_counter() - t0:.1f} s)")

    with routed_llama_logs(on_line):
        llama_cpp.llama_backend_init()
        rc = llama_cpp.llama_model_quantize(os.fsencode(job["src"]), os.fsencode(job["tmp"]), ctypes.byref(params))
    return {"rc": int(rc), "error": errors[-1] if errors else None}


def _quality_task(job: dict[str, Any], say: Progress, _debug: Callable[[str], None]) -> dict[str, Any]:
    """In the worker: ``measure_gguf_quality`` (both models load and run here, not in the export)."""
    from qwenvl_edge.quant.gguf_quality import measure_gguf_quality

    return measure_gguf_quality(Path(job["reference"]), Path(job["candidate"]), tuple(job["prompts"]),
                                job["n_threads"], say)


WORKER_TASKS: dict[str, Callable[[dict[str, Any], Progress, Callable[[str], None]], Any]] = {
    "quantize": _quantize_task, "quality": _quality_task}


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills the worker when the export dies (even by SIGKILL), so no orphan keeps writing."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def worker_main() -> int:
    """The worker: one JSON job on stdin; JSON lines out (``progress`` ..., then ``result`` or ``error``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it kills this process
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)  # anything llama.cpp prints itself goes to the log file, never into the replies

    def send(**message: Any) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:
        job = json.loads(sys.stdin.buffer.read())
        _die_with_parent(int(job["parent"]))
        debug = (lambda line: send(log=line)) if job.get("debug") else (lambda _line: None)
        send(result=WORKER_TASKS[job["task"]](job, lambda m: send(progress=m), debug))
        return 0
    except QwenVLError as e:
        send(error=str(e))
    except Exception as e:  # noqa: BLE001 (one line to the parent, which raises it as QwenVLError)
        send(error=f"{type(e).__name__}: {e}".replace("\n", " "))
    return 1


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(worker_main())
