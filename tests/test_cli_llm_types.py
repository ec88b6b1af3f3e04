"""Every ``--llm`` type beyond those test_gguf_quant covers really quantizes the tiny GGUF, loads and runs.

Each type costs 5-30 s (the tiny model keeps the real 151,936-row vocabulary), so ``python -m pytest``
runs only the smallest, Q2_K; ``QWENVL_TEST_ALL_LLM_TYPES=1`` runs them all, as ``.ci/run`` does in a
step of its own (all 14 passed: cosine to the F32 logits 0.79 for Q2_K up to 1.00 for BF16).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from qwenvl_edge.quant.gguf_quant import LLM_TYPES
from tests.gguf_builds import greedy, load_llama, quantized_gguf, read_gguf_metadata

COVERED_ELSEWHERE = {"Q4_K_M", "Q4_0", "Q8_0", "F16", "F32"}  # test_gguf_quant.py
DEFAULT_RUN = {"Q2_K"}
CASE = "text_only"
ALL = os.environ.get("QWENVL_TEST_ALL_LLM_TYPES") == "1"
TYPES = [t for t in LLM_TYPES if t not in COVERED_ELSEWHERE and (ALL or t in DEFAULT_RUN)]


@pytest.mark.parametrize("llm_type", TYPES)
def test_llm_type_quantizes_loads_and_runs(tmp_path_factory, tiny_ckpt: Path, golden, llm_type: str) -> None:
    path = quantized_gguf(tmp_path_factory, tiny_ckpt, llm_type)
    assert read_gguf_metadata(path)[gguf.Keys.General.FILE_TYPE] == str(int(LLM_TYPES[llm_type]))
    logits, _ = greedy(load_llama(path), golden.cases[CASE]["input_ids"], 0)
    want = golden.logits_last(CASE)
    cosine = float(logits @ want / (np.linalg.norm(logits) * np.linalg.norm(want)))
    print(f"{llm_type}: {path.stat().st_size / 2**20:.1f} MiB, cosine to the F32 logits {cosine:.4f}")
    assert np.isfinite(logits).all()
    assert cosine > 0.6  # random weights, 2..16 bits: measured 0.75 (Q2_K) .. 1.0 (BF16)
    path.unlink()  # 40-320 MB each: do not keep them for the rest of the session
