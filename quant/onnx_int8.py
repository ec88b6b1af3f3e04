"""INT8 vision graph from the finished FP32 file, tensor by tensor, a few ViT blocks at a time.

Only the weight MatMuls are quantized (each ``MatMul`` whose B input is an initializer): the
attention score/context products, LayerNorms, GELU and softmax stay in float, and so does the
patch-embedding Conv (under 0.1% of the compute; quantizing it changed nothing measurable).
``exclude`` keeps more nodes in float by node-name prefix. By default that is the adapter and
the final projection: 2.6% of the FLOPs at full size, but the adapter's kv_proj reads the raw
residual stream (no LayerNorm before it), where real ViTs keep their outlier channels, and on
the tiny golden leaving them in float lifts the worst row cosine from 0.9993 to 0.9997.

Each weight MatMul becomes the fused operator the session would have made of onnxruntime's
``quantize_dynamic`` graph (``DynamicQuantizeMatMul``, same weights bit for bit) or ``MatMulNBits``,
its weight quantized alone (``quant.matmul_rewrite``): the stage reads the FP32 weights once and
writes the INT8 ones once. The calibrated QDQ scheme (``static``) still goes through
``quantize_static``, piece by piece.

**Why the default is uint8 weights (``dynamic-u8``).** onnxruntime's MLAS runs an int8-weight x
uint8-activation product on x86 CPUs without VNNI (AVX2 only: AMD before Zen 4, Intel before Ice
Lake / Alder Lake; also AVX-512 without VNNI) with ``vpmaddubsw``, which adds two u8 x s8 products
into a *saturating* 16-bit sum (255 x 127 x 2 > 32767): rows drift (min cosine 0.990 on the tiny
golden under ``qemu-x86_64 -cpu Haswell``). uint8 x uint8 is widened to 16 bits first there
(``vpmaddwd``: exact), and on VNNI (``vpdpbusd``), AMX and ARM64 (``udot``/``sdot``, or ``umull``
widening without dot-product) every scheme accumulates exactly in 32 bits. So u8 x u8 gives the
same rows on every CPU. The s8 schemes are far faster where VNNI / AMX run them (benchmarks/
int8_schemes.md); ``dynamic-s7`` (7-bit weights) cannot saturate and is portable, but its coarser
weights leave the tiny trained model's worst task row at 0.972 after the floor below (``dynamic-u8``:
0.991), so it is an option, not the default. ``MatMulNBits`` (8-bit blocks, int8 activations) was
slower than ``dynamic-u8`` on both kinds of CPU measured, and 4 bits miss the floor on every tower.

**Accuracy floor (``--int8-floor``, default 0.99).** Dynamic INT8 can move an attention score across
its margin at a few patches: on the tiny trained model the worst row cosine is 0.983 on the calibration
images (0.65 on sign images) while the mean is 0.9998, all from one MatMul (block 1's ``in_proj``). When
the worst calibration row is below the floor, every quantized MatMul is scored alone (quantized by
itself inside its ViT block, fed FP32 activations; the worst relative row error at the block's
outputs), and the highest-ranked 1, 2, 4, ... stay in float, one full pass each, until the floor holds.
A model that meets the floor pays nothing extra. A floor of 1.0 keeps every MatMul in float (the export
warns that the file is then as large as FP32) rather than failing after the work is done.

Memory stays bounded at any size: the FP32 graph is cut into pieces of a few blocks
(``quant.onnx_pieces``) whose weights are read in place (the FP32 ``.data`` hard-linked beside the
piece graphs, or copied into each piece where no link can be made), each piece is quantized alone, and
the quantized pieces are joined into one graph whose weights stream into ``<out>.data``. The
FP32-vs-INT8 row quality is measured on the way, piece by piece, so no whole FP32 session (15 GB at
full size with its prepacked copies) is ever opened; at full size on 2 calibration images and no held-out
one (``measured_counts``), since each image is a whole FP32 and INT8 encode.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.onnx_files import ExternalDataWriter, external_data_path, staged_model_files
from qwenvl_edge.quant.calibration import (
    CALIBRATION_SEED,
    HELDOUT_SEED,
    ActivationCalibrationReader,
    generate_images,
    preprocess_all,
)
from qwenvl_edge.quant.matmul_rewrite import rewrite_model
from qwenvl_edge.quant.onnx_pieces import (
    DEFAULT_PIECE_BYTES,
    GraphAssembler,
    Piece,
    WeightSource,
    data_files,
    iter_piece_models,
    link_data_files,
    tensor_nbytes,
)
from qwenvl_edge.quant.registry import (  # noqa: F401 (re-exported)
    DEFAULT_INT8_FLOOR,
    DEFAULT_SCHEME,
    S8_CAVEAT,
    SCHEMES,
    Int8Scheme,
    check_int8_floor,
)
from qwenvl_edge.quant.vision_quality import PieceRunner, compare_rows
from qwenvl_edge.runtime.preprocess import ImageSource

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 512 * 2**20  # as the FP32 export: above this the weights go to <out>.data
N_CALIBRATION_IMAGES = 8
N_HELDOUT_IMAGES = 4
N_MEASURED_CALIBRATION = 4  # quality is measured on this many calibration images (each costs two full runs)
# Each measured image is one FP32 and one INT8 encode (17 + 16 s at full size on the Xeon of issue 29, where
# the whole FP32 export stage takes 63 s): images x FP32 weight bytes stays under this, so small towers
# measure 4 + 4 images and the full size 2 calibration images, no held-out one.
MEASURE_BUDGET_BYTES = 16 * 2**30
DEFAULT_EXCLUDE = ("/visual/adapter/", "/visual/proj/")

Progress = Callable[[str], None]


def measured_counts(weight_bytes: int) -> tuple[int, int]:
    """(calibration, held-out) images the quality check carries through FP32 and INT8 for a tower of
    ``weight_bytes``: as many as ``MEASURE_BUDGET_BYTES`` allows, at least 2 calibration images (the floor is
    checked on them), at most 4 + 4."""
    total = max(2, min(N_MEASURED_CALIBRATION + N_HELDOUT_IMAGES, MEASURE_BUDGET_BYTES // max(weight_bytes, 1)))
    calibration = min(N_MEASURED_CALIBRATION, max(2, (total + 1) // 2))
    return calibration, min(N_HELDOUT_IMAGES, total - calibration)


def weight_matmuls(model: onnx.ModelProto, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """(names to quantize, names kept in float) of the MatMuls whose B input is a weight."""
    weights = {t.name for t in model.graph.initializer}
    quantize, keep = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            (keep if node.name.startswith(tuple(exclude)) else quantize).append(node.name)
    return quantize, keep


class _DropPreprocessHint(logging.Filter):
    """quantize_* log (on the root logger) a hint to run ORT's shape pre-processing first. The graph
    already declares the shapes ONNX cannot infer (the MultiHeadAttention outputs), so the hint is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _run_static_quantizer(s: Int8Scheme, src: Path, dst: Path, to_quantize: list[str],
                          calibration: ActivationCalibrationReader) -> None:
    hint_filter = _DropPreprocessHint()
    logging.getLogger().addFilter(hint_filter)
    try:
        quantize_static(src, dst, calibration, quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul"], nodes_to_quantize=to_quantize, per_channel=s.per_channel,
                        weight_type=QuantType[s.weight_type], reduce_range=s.reduce_range)
    finally:
        logging.getLogger().removeFilter(hint_filter)


@dataclass
class _Job:
    """What every pass over the pieces shares: the FP32 file, the scheme, the measured images, the scratch."""

    fp32_path: Path
    header: onnx.ModelProto
    scheme: Int8Scheme
    sets: dict[str, list[np.ndarray]]
    extra: list[np.ndarray]  # FP32 activations of these calibrate the static scheme
    staged: Path
    out_name: str
    external: bool
    scratch: Path
    n_threads: int | None
    max_piece_bytes: int
    say: Progress
    weights: WeightSource = field(init=False)
    linked: bool = field(init=False)  # the FP32 .data is hard-linked into the scratch folder: pieces point into it

    def __post_init__(self) -> None:
        self.weights = WeightSource(self.fp32_path, self.header.graph)
        # quantize_static loads its piece through onnx.load, which refuses hard-linked data
        self.linked = self.scheme.method != "static" and link_data_files(self.fp32_path, self.header, self.scratch)

    def pieces(self, max_bytes: int | None = None) -> Iterator[tuple[int, int, Piece, onnx.ModelProto]]:
        return iter_piece_models(self.fp32_path, max_bytes or self.max_piece_bytes, inline=not self.linked)

    def runner(self, sets: dict[str, list[np.ndarray]] | None = None) -> PieceRunner:
        return PieceRunner(self.header.graph.input[0].name, self.sets if sets is None else sets, self.n_threads,
                           extra=self.extra)

    def quantize_piece(self, runner: PieceRunner, piece: Piece, model: onnx.ModelProto, src: Path, dst: Path,
                       nodes: list[str]) -> None:
        """``nodes`` of one piece (``model``, saved at ``src``) quantized into ``dst``: tensor by tensor
        (``matmul_rewrite``), or through ``quantize_static`` for the calibrated QDQ scheme."""
        if not nodes:
            shutil.copyfile(src, dst)
        elif self.scheme.method == "static":
            reader = ActivationCalibrationReader(runner.calibration_feeds(piece.inputs))
            _run_static_quantizer(self.scheme, src, dst, nodes, reader)
        else:
            # linked pieces point into the FP32 .data; inline ones already hold their weights
            weight = self.weights.array if self.linked else None
            onnx.save(rewrite_model(model, set(nodes), self.scheme, weight), str(dst))


def _quantize_pass(job: _Job, quantize: set[str]) -> PieceRunner:
    """One pass over the pieces: quantize the MatMuls in ``quantize``, join the pieces into the staged file
    (its weights into the staged ``.data``), and carry the measured images through FP32 and INT8 side by side."""
    runner = job.runner()
    data_file = open(external_data_path(job.staged), "wb") if job.external else None  # noqa: SIM115 (closed below)
    try:
        assembler = GraphAssembler(job.header, ExternalDataWriter(data_file, job.out_name) if data_file else None)
        for i, n, piece, model in job.pieces():
            job.say(f"vision int8: piece {i + 1}/{n} ({piece.label}, {piece.nbytes / 2**20:.0f} MiB FP32)")
            fp32_piece, int8_piece = job.scratch / f"piece{i}_fp32.onnx", job.scratch / f"piece{i}_int8.onnx"
            onnx.save(model, str(fp32_piece))
            nodes = [x.name for x in piece.nodes if x.name in quantize]
            job.quantize_piece(runner, piece, model, fp32_piece, int8_piece, nodes)
            del model
            runner.run_piece(fp32_piece, int8_piece, piece.inputs, piece.outputs, piece.live_after)
            quantized = onnx.load(str(int8_piece), load_external_data=False)
            assembler.add(quantized, WeightSource(int8_piece, quantized.graph))
            fp32_piece.unlink()
            int8_piece.unlink()
        onnx.save(assembler.model, str(job.staged))
    finally:
        if data_file:
            data_file.close()
    return runner


def rank_matmuls(job: _Job, candidates: Sequence[str]) -> list[tuple[str, float]]:
    """The candidates, most sensitive first: each one quantized alone inside its own ViT block, fed the FP32
    activations of the calibration images, scored by the worst row's relative error it causes at the block's
    outputs (the residual stream every later block reads through a LayerNorm, so scores compare across blocks).

    One quantizer call and one block run per MatMul: about one more quantization pass in all, at any size
    (48 blocks x 4 MatMuls at full size), where measuring each MatMul at the graph's output would cost a
    whole-graph run per MatMul.
    """
    runner = job.runner({"calibration": job.sets["calibration"]})
    wanted, scores = set(candidates), {}
    for i, n, piece, model in job.pieces(max_bytes=1):  # one block (group) per piece
        fp32_piece = job.scratch / f"rank{i}_fp32.onnx"
        onnx.save(model, str(fp32_piece))
        nodes = [x.name for x in piece.nodes if x.name in wanted]
        if nodes:
            job.say(f"vision int8: sensitivity of {len(nodes)} MatMuls in {piece.label} ({i + 1}/{n})")
            reference = runner.outputs_on_reference(fp32_piece, "calibration", piece.inputs, piece.outputs)
            alone = job.scratch / f"rank{i}_one.onnx"
            for node in nodes:
                job.quantize_piece(runner, piece, model, fp32_piece, alone, [node])
                got = runner.outputs_on_reference(alone, "calibration", piece.inputs, piece.outputs)
                scores[node] = max(compare_rows(r, g)["rel_error_max"] for r, g in zip(reference, got, strict=True))
                alone.unlink()
        del model
        runner.advance_reference(fp32_piece, piece.inputs, piece.outputs, piece.live_after)
        fp32_piece.unlink()
    return sorted(scores.items(), key=lambda item: -item[1])


def _worst(runner: PieceRunner, output: str) -> float:
    return compare_rows(*runner.rows("calibration", output))["cosine_min"]


def _hold_floor(job: _Job, to_quantize: list[str], floor: float, output: str
                ) -> tuple[PieceRunner, dict[str, Any]]:
    """Quantize everything; while the worst calibration row is below ``floor``, keep the most sensitive
    MatMuls in float (1, 2, 4, ... in rank order, a full pass each) until it holds. The staged file is the
    last pass's."""
    runner = _quantize_pass(job, set(to_quantize))
    before = _worst(runner, output)
    report: dict[str, Any] = {"floor": floor, "measured_on": "calibration", "candidates": len(to_quantize),
                              "cosine_min_before": before, "cosine_min_after": before, "met": before >= floor,
                              "kept_in_float": [], "passes": 1}
    if before >= floor or not to_quantize:
        return runner, report
    job.say(f"vision int8: worst row cosine {before:.4f} on the calibration images is below the floor {floor}: "
            f"ranking the {len(to_quantize)} quantized MatMuls by sensitivity")
    ranked = rank_matmuls(job, to_quantize)
    order = [name for name, _ in ranked]
    k, after = 0, before
    while after < floor and k < len(order):
        k = min(max(1, 2 * k), len(order))
        job.say(f"vision int8: keeping the {k} most sensitive MatMuls in float and quantizing again")
        runner = _quantize_pass(job, set(to_quantize) - set(order[:k]))
        after, report["passes"] = _worst(runner, output), report["passes"] + 1
    all_float = k == len(order)
    report.update(cosine_min_after=after, met=after >= floor or all_float, all_float=all_float,
                  kept_in_float=order[:k], sensitivity={name: score for name, score in ranked[:k]},
                  reason=f"worst INT8 row cosine {before:.4f} on the calibration images was below the floor "
                         f"{floor}; the most sensitive MatMuls (each quantized alone in its block: worst relative "
                         "row error at the block's outputs) stay in float until it holds")
    return runner, report


def quantize_vision(fp32_path: Path, out_path: Path, scheme: str = DEFAULT_SCHEME,
                    calibration_images: Sequence[ImageSource] | None = None,
                    exclude: Sequence[str] = DEFAULT_EXCLUDE,
                    heldout_images: Sequence[ImageSource] | None = None,
                    n_threads: int | None = None, progress: Progress | None = None,
                    max_piece_bytes: int = DEFAULT_PIECE_BYTES, floor: float = DEFAULT_INT8_FLOOR) -> dict:
    """Quantize ``fp32_path`` into ``out_path`` (+ ``.data`` when large) and return the quality report.

    ``calibration_images`` (files or PIL images) calibrate the static scheme and are measured for
    every scheme; without them a generated set is used. ``heldout_images`` default to another
    generated set. Quality is measured on the first calibration images and on the held-out ones
    (``measured_counts``: 4 + 4 on small towers, 2 + 0 at full size). Where the worst calibration row's
    cosine is below ``floor`` the most sensitive MatMuls stay in float until it holds (the report's ``floor``
    section says which).
    Written in a hidden sibling folder and moved into place: on failure nothing is left.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if scheme not in SCHEMES:
        raise QwenVLError(f"unknown INT8 scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    try:
        floor = check_int8_floor(floor)
    except ValueError as e:
        raise QwenVLError(str(e)) from None
    if not fp32_path.is_file():
        raise QwenVLError(f"{fp32_path}: FP32 vision model not found")
    s = SCHEMES[scheme]
    say = progress or (lambda _m: None)
    header = onnx.load(str(fp32_path), load_external_data=False)  # graph only: names, not weights
    to_quantize, kept = weight_matmuls(header, exclude)
    external = bool(data_files(header)) or fp32_path.stat().st_size > EXTERNAL_DATA_BYTES
    size = header.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    calibration = list(calibration_images) if calibration_images else generate_images(N_CALIBRATION_IMAGES,
                                                                                        CALIBRATION_SEED)
    n_calibration, n_heldout = measured_counts(sum(tensor_nbytes(t) for t in header.graph.initializer))
    heldout = list(heldout_images) if heldout_images else generate_images(n_heldout, HELDOUT_SEED)
    log.info("vision int8 (%s): quantizing %d MatMuls, %d kept in float", scheme, len(to_quantize), len(kept))

    calibration_pixels = preprocess_all(calibration, size)  # bad user images fail here, before any work
    sets = {"calibration": calibration_pixels[:n_calibration]}
    if heldout:  # none by default at full size (``measured_counts``)
        sets["heldout"] = preprocess_all(heldout, size)
    output = header.graph.output[0].name
    with staged_model_files(out_path) as staged, \
            tempfile.TemporaryDirectory(prefix=".int8-pieces.", dir=out_path.parent) as scratch_dir:
        job = _Job(fp32_path, header, s, sets, calibration_pixels if s.method == "static" else [], staged,
                   external_data_path(out_path).name, external, Path(scratch_dir), n_threads, max_piece_bytes, say)
        runner, floor_report = _hold_floor(job, to_quantize, floor, output)
        onnx.checker.check_model(str(staged))
    quality = {name: {"images": len(pixels), **compare_rows(*runner.rows(name, output))}
               for name, pixels in sets.items()}
    n_float = len(floor_report["kept_in_float"])
    return {
        "scheme": scheme,
        "method": s.method,
        "weight_type": s.weight_type,
        "per_channel": s.per_channel,
        "reduce_range": s.reduce_range,
        "description": s.description,
        **({"caveat": s.caveat} if s.caveat else {}),
        "activation_type": "int8 per block" if s.method == "nbits" else QuantType.QUInt8.name,
        "exclude": list(exclude),
        "quantized_matmuls": len(to_quantize) - n_float,
        "float_matmuls": len(kept) + n_float,
        "calibration_images": {"source": "user" if calibration_images else f"generated (seed {CALIBRATION_SEED})",
                               "count": len(calibration)},
        "quality": quality,
        "floor": floor_report,
    }
