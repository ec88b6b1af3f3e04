"""GGUF quantization by llama.cpp: every type loads and runs, Q4_K_M keeps the golden top-1, bad input is one line."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.quant.gguf_quant import LLM_TYPES, quantize_gguf
from tests.gguf_builds import float_gguf, greedy, load_llama, quantized_gguf, read_gguf_metadata, read_gguf_tensors

GOLDEN_CASE = "text_only"
K_QUANTS = {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_llm_types_are_llama_cpp_file_types() -> None:
    """Each --llm name asks llama.cpp for the file type of that name (not a neighbour's number)."""
    llama_names = {"Q4_K_M": "Q4_K - Medium", "Q2_K": "Q2_K - Medium", "Q3_K_S": "Q3_K - Small",
                   "Q3_K_M": "Q3_K - Medium", "Q3_K_L": "Q3_K - Large", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
                   "Q4_K_S": "Q4_K - Small", "IQ4_NL": "IQ4_NL - 4.5 bpw", "IQ4_XS": "IQ4_XS - 4.25 bpw",
                   "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q5_K_S": "Q5_K - Small", "Q5_K_M": "Q5_K - Medium",
                   "Q6_K": "Q6_K", "Q8_0": "Q8_0", "F16": "F16", "BF16": "BF16", "F32": "all F32"}
    assert {name: llama_cpp.llama_ftype_name(int(t)).decode() for name, t in LLM_TYPES.items()} == llama_names


def test_q4_k_m_keeps_the_golden_top1(tmp_path_factory, tiny_ckpt: Path, golden) -> None:
    path = quantized_gguf(tmp_path_factory, tiny_ckpt, "Q4_K_M")
    assert read_gguf_metadata(path)[gguf.Keys.General.FILE_TYPE] == str(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    types = {name: t.type for name, t in read_gguf_tensors(path).items()}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q6_K  # llama.cpp's mix, not ours
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    case = golden.cases[GOLDEN_CASE]
    logits, generated = greedy(load_llama(path), case["input_ids"], len(case["generated_ids"]))
    want = golden.logits_last(GOLDEN_CASE)
    agree = sum(a == b for a, b in zip(generated, case["generated_ids"], strict=True))
    print(f"Q4_K_M {path.stat().st_size / 2**20:.1f} MiB: max |logit diff| {np.abs(logits - want).max():.3f}, "
          f"cosine {cosine(logits, want):.5f}, greedy ids agreeing {agree}/{len(generated)}")
    assert int(np.argmax(logits)) == int(np.argmax(want)) == case["generated_ids"][0]
    assert cosine(logits, want) > 0.95  # random weights have no outliers to protect; 0.976 measured


@pytest.mark.parametrize("llm_type, min_cosine", [("Q4_0", 0.93), ("Q8_0", 0.999)])
def test_other_types_load_and_run(tmp_path_factory, tiny_ckpt: Path, golden, llm_type: str, min_cosine: float) -> None:
    path = quantized_gguf(tmp_path_factory, tiny_ckpt, llm_type)
    assert read_gguf_metadata(path)[gguf.Keys.General.FILE_TYPE] == str(int(LLM_TYPES[llm_type]))
    logits, _ = greedy(load_llama(path), golden.cases[GOLDEN_CASE]["input_ids"], 0)
    want = golden.logits_last(GOLDEN_CASE)
    print(f"{llm_type} {path.stat().st_size / 2**20:.1f} MiB: max |logit diff| {np.abs(logits - want).max():.3f}, "
          f"cosine {cosine(logits, want):.5f}, top-1 kept {int(np.argmax(logits)) == int(np.argmax(want))}")
    assert cosine(logits, want) > min_cosine


def current_llama_log_sink() -> tuple[int | None, int | None]:
    callback, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(data))
    return ctypes.cast(callback, ctypes.c_void_p).value, data.value


def test_progress_per_tensor_and_log_sink_restored(tmp_path_factory, tmp_path: Path, tiny_ckpt: Path, golden) -> None:
    """F16 through llama.cpp: one progress line per tensor, llama.cpp's log sink put back afterwards."""
    src = float_gguf(tmp_path_factory, tiny_ckpt, "F32")
    before = current_llama_log_sink()
    messages: list[str] = []
    quantize_gguf(src, tmp_path / "f16.gguf", "F16", n_threads=2, progress=messages.append)
    assert current_llama_log_sink() == before
    assert sum(m.startswith("quantized F16 [") for m in messages) == 19
    assert messages[-1].startswith("wrote f16.gguf: F16") and sorted(p.name for p in tmp_path.iterdir()) == ["f16.gguf"]
    logits, _ = greedy(load_llama(tmp_path / "f16.gguf"), golden.cases[GOLDEN_CASE]["input_ids"], 0)
    assert cosine(logits, golden.logits_last(GOLDEN_CASE)) > 0.9999


def test_k_quant_falls_back_for_rows_not_divisible_by_256(tmp_path_factory, odd_ckpt: Path) -> None:
    """odd_ckpt's MLP branch is 384 wide: llama.cpp stores ffn_down (rows of 384) in a non-k type, and it loads."""
    path = quantized_gguf(tmp_path_factory, odd_ckpt, "Q5_K_M")
    types = {name: t.type for name, t in read_gguf_tensors(path).items()}
    assert types["blk.0.ffn_down.weight"] not in K_QUANTS
    assert types["blk.0.attn_qkv.weight"] in K_QUANTS  # rows of 256
    ids = [9707, 0, 10479, 525, 498, 30]
    quant, _ = greedy(load_llama(path), ids, 0)
    ref, _ = greedy(load_llama(float_gguf(tmp_path_factory, odd_ckpt, "F32")), ids, 0)
    print(f"odd Q5_K_M: ffn_down stored as {types['blk.0.ffn_down.weight'].name}, "
          f"cosine to F32 {cosine(quant, ref):.5f}")
    assert cosine(quant, ref) > 0.99


def test_unknown_type_lists_the_accepted_names(tmp_path: Path) -> None:
    accepted = ("Q4_K_M, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_0, Q4_1, Q4_K_S, IQ4_NL, IQ4_XS, Q5_0, Q5_1, Q5_K_S, "
                "Q5_K_M, Q6_K, Q8_0, F16, BF16, F32")
    with pytest.raises(QwenVLError, match=rf"unknown LLM type 'Q3_X'; choose {accepted}$"):
        quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q3_X")
    assert list(tmp_path.iterdir()) == []


def test_missing_input_existing_output_and_non_gguf(tmp_path: Path) -> None:
    with pytest.raises(QwenVLError, match=r"in.gguf: no such GGUF file"):
        quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf")
    src = tmp_path / "in.gguf"
    src.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(QwenVLError, match=r"in.gguf: not a GGUF file"):
        quantize_gguf(src, tmp_path / "out.gguf")
    (tmp_path / "out.gguf").write_bytes(b"keep me")
    with pytest.raises(QwenVLError, match=r"out.gguf: already exists"):
        quantize_gguf(src, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == b"keep me"


def test_llama_cpp_failure_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A GGUF whose header llama.cpp rejects: non-zero return code -> QwenVLError, no output, no temp file."""
    src = tmp_path / "broken.gguf"
    src.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64)
    with pytest.raises(QwenVLError, match=r"broken.gguf: llama.cpp quantization to Q4_0 failed with code 1 "
                                          r"\(llama_model_quantize: failed to quantize: .*failed to load model") as err:
        quantize_gguf(src, tmp_path / "out.gguf", "Q4_0", n_threads=1)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]
