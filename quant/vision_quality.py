"""How far INT8 image rows are from FP32 rows: the number every vision quantization reports.

Rows are what the LLM consumes (256 per image), so the metrics are per row: cosine similarity
(direction, what attention mostly sees) and relative L2 error (magnitude too). The report is a
plain dict of floats: the bundle manifest stores it and the export prints ``format_quality``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


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


def _session(path: Path, n_threads: int | None) -> ort.InferenceSession:
    """Options as the runtime's encoder sets them, so the measured rows are the rows users get."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = n_threads or 0
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class PieceRunner:
    """Runs images through a graph piece by piece, FP32 and INT8 side by side, one image per run.

    One image per run as the runtime's encoder does it (dynamic INT8 scales activations per run).
    Only the activations later pieces read are kept (7 MB per image at full size), and each piece's
    sessions live only while that piece runs: no whole FP32 session is ever opened.
    """

    def __init__(self, input_name: str, sets: Mapping[str, Sequence[np.ndarray]], n_threads: int | None = None,
                 extra: Sequence[np.ndarray] = ()):
        self.n_threads = n_threads
        self.fp32: list[dict[str, np.ndarray]] = [{input_name: x[None]} for x in extra]
        self.calibration_ids = list(range(len(extra)))  # FP32 activations that calibrate the static scheme
        self.set_ids: dict[str, list[int]] = {}
        for name, pixels in sets.items():
            ids = []
            for x in pixels:
                same = [i for i in self.calibration_ids if np.array_equal(self.fp32[i][input_name][0], x)]
                if not same:
                    self.fp32.append({input_name: x[None]})
                ids.append(same[0] if same else len(self.fp32) - 1)
            self.set_ids[name] = ids
        self.int8 = {i: dict(self.fp32[i]) for ids in self.set_ids.values() for i in ids}

    def calibration_feeds(self, inputs: Sequence[str]) -> list[dict[str, np.ndarray]]:
        return [{k: self.fp32[i][k] for k in inputs} for i in self.calibration_ids]

    @staticmethod
    def _advance(session: ort.InferenceSession, acts: dict[str, np.ndarray], inputs: Sequence[str],
                 outputs: Sequence[str], live: set[str]) -> None:
        results = session.run(list(outputs), {k: acts[k] for k in inputs})
        acts.update(zip(outputs, results, strict=True))
        for k in [k for k in acts if k not in live]:
            del acts[k]

    def run_piece(self, fp32_path: Path, int8_path: Path, inputs: Sequence[str], outputs: Sequence[str],
                  live_after: Sequence[str]) -> None:
        """Advance both chains through one piece (FP32 session first, then the INT8 one, never both)."""
        live = set(live_after)
        session = _session(fp32_path, self.n_threads)
        for acts in self.fp32:
            self._advance(session, acts, inputs, outputs, live)
        session = _session(int8_path, self.n_threads)
        for acts in self.int8.values():
            self._advance(session, acts, inputs, outputs, live)
        del session

    def advance_reference(self, fp32_path: Path, inputs: Sequence[str], outputs: Sequence[str],
                          live_after: Sequence[str]) -> None:
        """Advance the FP32 chain alone through one piece (the sensitivity pass has no INT8 chain to carry)."""
        session = _session(fp32_path, self.n_threads)
        for acts in self.fp32:
            self._advance(session, acts, inputs, outputs, set(live_after))
        del session

    def outputs_on_reference(self, path: Path, set_name: str, inputs: Sequence[str],
                             outputs: Sequence[str]) -> list[np.ndarray]:
        """``path``'s outputs (one array each, images stacked) when fed the FP32 chain's activations of a set:
        what a piece does on its own, free of the error earlier pieces bring in."""
        session = _session(path, self.n_threads)
        per_image = [session.run(list(outputs), {k: self.fp32[i][k] for k in inputs}) for i in self.set_ids[set_name]]
        del session
        return [np.concatenate([got[j] for got in per_image]) for j in range(len(outputs))]

    def rows(self, set_name: str, output: str) -> tuple[np.ndarray, np.ndarray]:
        """(FP32 rows, INT8 rows) of one image set, [n, 256, hidden] each."""
        ids = self.set_ids[set_name]
        return (np.concatenate([self.fp32[i][output] for i in ids]),
                np.concatenate([self.int8[i][output] for i in ids]))


def format_quality(report: Mapping[str, Mapping[str, float]]) -> str:
    """One line per image set, for the export's output."""
    return "\n".join(
        f"{name}: {int(m['images'])} images, row cosine min {m['cosine_min']:.4f} mean {m['cosine_mean']:.4f}, "
        f"relative error max {m['rel_error_max']:.4f} mean {m['rel_error_mean']:.4f}"
        for name, m in report.items())


def format_floor(floor: Mapping) -> str:
    """The export's line on the ``--int8-floor`` check: what was kept in float, and the worst row before/after."""
    before, after, kept = floor["cosine_min_before"], floor["cosine_min_after"], floor["kept_in_float"]
    if not kept:
        return (f"int8 floor {floor['floor']}: worst row cosine {before:.4f} on the calibration images holds it; "
                "no MatMul kept in float")
    text = (f"int8 floor {floor['floor']}: worst row cosine {before:.4f} -> {after:.4f} on the calibration images "
            f"with {len(kept)} of {floor['candidates']} quantizable MatMuls kept in float (most sensitive first): "
            f"{', '.join(kept)}")
    if not floor["met"]:
        text += f"; the floor is still not met with every one in float ({after:.6f})"
    elif floor.get("all_float"):
        text += "; every one is in float: vision.onnx is as large as FP32 (--vision fp32 or a lower floor)"
    return text
