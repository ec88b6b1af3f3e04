"""How far INT8 image rows are from FP32 rows: the number every vision quantization reports.

Rows are what the LLM consumes (256 per image), so the metrics are per row: cosine similarity
(direction, what attention mostly sees) and relative L2 error (magnitude too). The report is a
plain dict of floats: the bundle manifest stores it and the export prints ``format_quality``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

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


def measure_vision_quality(fp32_path: Path, int8_path: Path, image_sets: Mapping[str, Sequence[ImageSource]],
                           n_threads: int | None = None) -> dict[str, dict[str, float]]:
    """``{set name: compare_rows(...)}`` for each named image set (e.g. calibration, heldout)."""
    report: dict[str, dict[str, float]] = {}
    with VisionEncoder(fp32_path, n_threads) as ref, VisionEncoder(int8_path, n_threads) as quant:
        for name, images in image_sets.items():
            pixels = preprocess_all(images, ref.image_size)
            batch = np.stack(pixels)  # (n, 3, S, S); the encoders run one image at a time
            report[name] = {"images": len(pixels), **compare_rows(ref.encode(batch), quant.encode(batch))}
    return report


def format_quality(report: Mapping[str, Mapping[str, float]]) -> str:
    """One line per image set, for the export's output."""
    return "\n".join(
        f"{name}: {int(m['images'])} images, row cosine min {m['cosine_min']:.4f} mean {m['cosine_mean']:.4f}, "
        f"relative error max {m['rel_error_max']:.4f} mean {m['rel_error_mean']:.4f}"
        for name, m in report.items())
