"""Quantize a finished float GGUF with llama.cpp's own quantizer, in-process.

The float file stays the reference; this is a separate pass over it. llama.cpp picks the
per-tensor types of a mix such as Q4_K_M itself (e.g. Q6_K for ``output.weight``) and falls
back to a type without 256-wide blocks for rows that k-quants cannot split. Its per-tensor log
lines are routed to this module's logger at DEBUG level (visible with ``-v``), and turned into
``progress`` messages, instead of going to stderr.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import llama_cpp

from qwenvl_edge.errors import QwenVLError

log = logging.getLogger(__name__)

# Names accepted by ``--llm``, and the llama.cpp file type each one asks for: every type llama.cpp's
# quantizer makes without an importance matrix (IQ1_*, IQ2_*, Q2_K_S refuse to run without one; IQ3_*
# run but are meant for one; TQ1_0/TQ2_0 suit only ternary-trained models; MXFP4 only MoE experts).
LLM_TYPES: dict[str, gguf.LlamaFileType] = {
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,  # the default: first, so listings start with it
    "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
    "Q3_K_S": gguf.LlamaFileType.MOSTLY_Q3_K_S,
    "Q3_K_M": gguf.LlamaFileType.MOSTLY_Q3_K_M,
    "Q3_K_L": gguf.LlamaFileType.MOSTLY_Q3_K_L,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q4_K_S": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "IQ4_NL": gguf.LlamaFileType.MOSTLY_IQ4_NL,
    "IQ4_XS": gguf.LlamaFileType.MOSTLY_IQ4_XS,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q5_K_S": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "Q5_K_M": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "F32": gguf.LlamaFileType.ALL_F32,
}

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

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != GGML_LOG_LEVEL_CONT:
            line_level[0] = level
        pending.append(text.decode("utf-8", errors="replace"))
        if pending[-1].endswith("\n"):
            line, pending[:] = "".join(pending).rstrip("\n"), []
            on_line(line_level[0], line)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(old_callback, old_data)


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


def quantize_gguf(src: Path, dst: Path, llm_type: str = "Q4_K_M", n_threads: int | None = None,
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
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = n_threads if n_threads is not None else (os.cpu_count() or 1)

    t0 = time.perf_counter()
    errors: list[str] = []

    def on_line(level: int, line: str) -> None:
        log.debug("llama.cpp: %s", line)
        if level == GGML_LOG_LEVEL_ERROR:
            errors.append(line.strip())
        m = TENSOR_LINE.search(line)
        if m:
            say(f"quantized {llm_type} [{m[1]}/{m[2]}] {m[3]} ({time.perf_counter() - t0:.1f} s)")

    say(f"quantizing {src.name} -> {dst.name} as {llm_type} ({ftype.name}, {params.nthread} threads)")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    try:
        with routed_llama_logs(on_line):
            llama_cpp.llama_backend_init()
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            why = errors[-1] if errors else "run with -v for llama.cpp's log"
            raise QwenVLError(f"{src}: llama.cpp quantization to {llm_type} failed with code {rc} ({why})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"wrote {dst.name}: {llm_type}, {dst.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s")
