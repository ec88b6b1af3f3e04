"""GGUF files built once per test session and shared by the test modules that need them.

The tiny model still has the real 151,936-row vocabulary, so even its F32 GGUF is 320 MB and
takes seconds to write or quantize: each (checkpoint, type) is built at most once per run.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.llm_gguf import write_llm_gguf
from qwenvl_edge.quant.gguf_quant import quantize_gguf

_BUILT: dict[tuple[Path, str], Path] = {}


def float_gguf(factory: pytest.TempPathFactory, ckpt: Path, out_type: str = "F32") -> Path:
    """``write_llm_gguf`` of ``ckpt``, memoized for the session."""
    key = (ckpt, out_type)
    if key not in _BUILT:
        out = factory.mktemp("gguf") / f"{ckpt.name}-{out_type}.gguf"
        _BUILT[key] = write_llm_gguf(CheckpointReader(ckpt), out, out_type)
    return _BUILT[key]


def quantized_gguf(factory: pytest.TempPathFactory, ckpt: Path, llm_type: str) -> Path:
    """The F32 GGUF of ``ckpt`` quantized to ``llm_type``, memoized for the session."""
    key = (ckpt, f"quant-{llm_type}")
    if key not in _BUILT:
        src = float_gguf(factory, ckpt, "F32")
        dst = factory.mktemp("gguf") / f"{ckpt.name}-{llm_type}.gguf"
        quantize_gguf(src, dst, llm_type, n_threads=2)
        _BUILT[key] = dst
    return _BUILT[key]


def load_llama(path: Path, f32_cache: bool = False, **kw) -> llama_cpp.Llama:
    """A CPU llama.cpp context on ``path``; ``f32_cache`` keeps K/V in float32 instead of llama.cpp's F16 default.

    One thread: the tiny models gain nothing from two, and spinning threads crawl on a shared CI box.
    """
    if f32_cache:
        kw.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    return llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=1, n_threads_batch=1, seed=0,
                           verbose=False, **kw)


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """Logits of the last evaluated position (Llama.eval no longer copies them unless logits_all)."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def greedy(llm: llama_cpp.Llama, prompt: list[int], n_new: int) -> tuple[np.ndarray, list[int]]:
    """Evaluate ``prompt``; return its last logits and ``n_new`` argmax continuations (no sampler involved)."""
    llm.reset()
    llm.eval(prompt)
    first = last_logits(llm)
    logits, out = first, []
    for _ in range(n_new):
        out.append(int(np.argmax(logits)))
        llm.eval([out[-1]])
        logits = last_logits(llm)
    return first, out


def token_piece(llm: llama_cpp.Llama, token: int, special: bool = False) -> bytes:
    """The exact bytes of one token (llama-cpp-python's own helper returns a zero-padded buffer)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(512)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    assert n >= 0, f"token {token}: piece longer than {len(buf)} bytes"
    return buf.raw[:n]


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as llama.cpp's own GGUF parser sees it."""

    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF's ne reversed)
    data: np.ndarray  # memory-mapped bytes; use .array() for float types

    def array(self) -> np.ndarray:
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                 gguf.GGMLQuantizationType.BF16: np.uint16}[self.type]
        return self.data.view(dtype).reshape(self.shape)


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _ggml_gguf_api() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    for fn, res in [("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_data_offset", ctypes.c_size_t)]:
        getattr(lib, fn).argtypes, getattr(lib, fn).restype = [ctypes.c_void_p], res
    for fn, res in [("gguf_get_tensor_name", ctypes.c_char_p), ("gguf_get_tensor_offset", ctypes.c_size_t),
                    ("gguf_get_tensor_size", ctypes.c_size_t), ("gguf_get_tensor_type", ctypes.c_int),
                    ("gguf_get_tensor_ne", ctypes.POINTER(ctypes.c_int64))]:
        getattr(lib, fn).argtypes, getattr(lib, fn).restype = [ctypes.c_void_p, ctypes.c_int64], res
    return lib


def read_gguf_tensors(path: Path) -> dict[str, StoredTensor]:
    """Tensor table of a GGUF file through ggml's C parser (gguf-py's reader takes ~20 s on a 152k vocab)."""
    lib = _ggml_gguf_api()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    assert ctx, f"{path}: ggml cannot parse it"
    try:
        base = lib.gguf_get_data_offset(ctx)
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        out = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            ne = lib.gguf_get_tensor_ne(ctx, i)
            dims = [ne[d] for d in range(4)]
            while len(dims) > 1 and dims[-1] == 1:
                dims.pop()
            start = base + lib.gguf_get_tensor_offset(ctx, i)
            out[lib.gguf_get_tensor_name(ctx, i).decode()] = StoredTensor(
                gguf.GGMLQuantizationType(lib.gguf_get_tensor_type(ctx, i)), tuple(reversed(dims)),
                raw[start:start + lib.gguf_get_tensor_size(ctx, i)])
        return out
    finally:
        lib.gguf_free(ctx)


def read_gguf_metadata(path: Path) -> dict[str, str]:
    """The header's scalar keys as llama.cpp reports them (strings), loading the vocabulary only."""
    return dict(llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False).metadata)
