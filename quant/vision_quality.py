"""How far INT8 image rows are from FP32 rows: the number every vision quantization reports.

Rows are what the LLM consumes (256 per image), so the metrics are per row: cosine similarity
(direction, what attention mostly sees) and relative L2 error (magnitude too). The report is a
plain dict of floats: the bundle manifest stores it and the export prints ``format_quality``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from qwenvl_edge.quant.calibration import preprocess_all
from qwenvl_edge.runtime.preprocess import ImageSource
from qwenvl_edge.runtime.vision import VisionEncoder


def compare_rows(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Per-row cosine and relative error of ``candidate`` vs ``reference`` ([..., hidden] each)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"row shapes differ: {reference.shape} vs {candidate.shape}")
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cand = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    ref_norm = np.linalg.norm(ref, axis=1)
    cosine = (ref * cand).sum(1) / np.maximum(ref_norm * np.linalg.norm(cand, axis=1), 1e-30)
    rel = np.linalg.norm(cand - ref, axis=1) / np.maximum(ref_norm, 1e-30)
    return {
        "rows": int(ref.shape[0]),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "rel_error_max": float(rel.max()),
        "rel_error_mean": float(rel.mean()),
        "max_abs_error": float(np.abs(cand - ref).max()),
    }


def _encode_sets(path: Path, pixel_sets: Mapping[str, np.ndarray], n_threads: int | None) -> dict[str, np.ndarray]:
    with VisionEncoder(path, n_threads) as encoder:
        return {name: encoder.encode(batch) for name, batch in pixel_sets.items()}


def measure_vision_quality(fp32_path: Path, int8_path: Path, image_sets: Mapping[str, Sequence[ImageSource]],
                           n_threads: int | None = None) -> dict[str, dict[str, float]]:
    """``{set name: compare_rows(...)}`` for each named image set (e.g. calibration, heldout).

    One session at a time: at full size the FP32 session alone holds its weights and their
    prepacked copies (over 15 GB), so the INT8 one opens only after it is gone.
    """
    header = onnx.load(str(int8_path), load_external_data=False)  # the input shape, not the weights
    size = header.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    pixel_sets = {name: np.stack(preprocess_all(images, size)) for name, images in image_sets.items()}  # (n,3,S,S)
    reference = _encode_sets(fp32_path, pixel_sets, n_threads)
    quantized = _encode_sets(int8_path, pixel_sets, n_threads)
    return {name: {"images": len(pixel_sets[name]), **compare_rows(reference[name], quantized[name])}
            for name in pixel_sets}


def format_quality(report: Mapping[str, Mapping[str, float]]) -> str:
    """One line per image set, for the export's output."""
    return "\n".join(
        f"{name}: {int(m['images'])} images, row cosine min {m['cosine_min']:.4f} mean {m['cosine_mean']:.4f}, "
        f"relative error max {m['rel_error_max']:.4f} mean {m['rel_error_mean']:.4f}"
        for name, m in report.items())
