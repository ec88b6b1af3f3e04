"""INT8 vision graph: onnxruntime.quantization over the finished FP32 file, a few ViT blocks at a time.

Only the weight MatMuls are quantized (each ``MatMul`` whose B input is an initializer): the
attention score/context products, LayerNorms, GELU and softmax stay in float, and so does the
patch-embedding Conv (under 0.1% of the compute; quantizing it changed nothing measurable).
``exclude`` keeps more nodes in float by node-name prefix. By default that is the adapter and
the final projection: 2.6% of the FLOPs at full size, but the adapter's kv_proj reads the raw
residual stream (no LayerNorm before it), where real ViTs keep their outlier channels, and on
the tiny golden leaving them in float lifts the worst row cosine from 0.9993 to 0.9997.

**Why the default is uint8 weights (``dynamic-u8``).** onnxruntime's MLAS runs an int8-weight x
uint8-activation product on x86 CPUs without VNNI (AVX2 only: AMD before Zen 4, Intel before Ice
Lake / Alder Lake; also AVX-512 without VNNI) with ``vpmaddubsw``, which adds two u8 x s8 products
into a *saturating* 16-bit sum (255 x 127 x 2 > 32767): rows drift (min cosine 0.990 on the tiny
golden under ``qemu-x86_64 -cpu Haswell``). uint8 x uint8 is widened to 16 bits first there
(``vpmaddwd``: exact), and on VNNI (``vpdpbusd``) and ARM64 (``udot``/``sdot``, or ``umull``
widening without dot-product) every scheme accumulates exactly in 32 bits. So u8 x u8 gives the
same rows on every CPU; the s8 schemes are faster on VNNI / ARM (about 1.3x here) and are kept as
options with that caveat (``SCHEMES[...].caveat``).

Memory stays bounded at any size: the FP32 graph is cut into pieces of a few blocks
(``quant.onnx_pieces``), each piece goes through onnxruntime's quantizer alone, and the quantized
pieces are joined into one graph whose weights stream into ``<out>.data``. The FP32-vs-INT8 row
quality is measured on the way, piece by piece, so no whole FP32 session (15 GB at full size with
its prepacked copies) is ever opened.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.onnx_files import ExternalDataWriter, external_data_path, staged_model_files
from qwenvl_edge.quant.calibration import (
    CALIBRATION_SEED,
    HELDOUT_SEED,
    ActivationCalibrationReader,
    generate_images,
    preprocess_all,
)
from qwenvl_edge.quant.onnx_pieces import DEFAULT_PIECE_BYTES, GraphAssembler, iter_piece_models
from qwenvl_edge.quant.vision_quality import PieceRunner, compare_rows
from qwenvl_edge.runtime.preprocess import ImageSource

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 2_000_000_000  # as the FP32 export: above this the weights go to <out>.data
N_CALIBRATION_IMAGES = 8
N_HELDOUT_IMAGES = 4
N_MEASURED_CALIBRATION = 4  # quality is measured on this many calibration images (each costs two full runs)
DEFAULT_EXCLUDE = ("/visual/adapter/", "/visual/proj/")
S8_CAVEAT = ("int8 weights: fastest on CPUs with VNNI or ARM dot-product, but on AVX2-only x86 CPUs "
             "(no VNNI) onnxruntime's 16-bit sums saturate and the rows lose accuracy")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Int8Scheme:
    """One way to call onnxruntime.quantization on the vision graph."""

    method: str  # "dynamic" (activations quantized at run time) | "static" (QDQ, calibrated ranges)
    weight_type: QuantType
    per_channel: bool
    description: str
    caveat: str = ""  # printed by the export when the scheme's quality depends on the CPU that runs it
    reduce_range: bool = False


SCHEMES: dict[str, Int8Scheme] = {
    # the default: u8 x u8 is exact on every CPU (see the module docstring)
    "dynamic-u8": Int8Scheme("dynamic", QuantType.QUInt8, True,
                             "quantize_dynamic: uint8 weights per output channel, uint8 activations per run"),
    # int8 x uint8 products use VNNI (x86) / dot-product (ARM) kernels: the fastest there
    "dynamic": Int8Scheme("dynamic", QuantType.QInt8, True,
                          "quantize_dynamic: int8 weights per output channel, uint8 activations per run",
                          caveat=S8_CAVEAT),
    # 7-bit int8 weights cannot saturate 16-bit sums (255 x 64 x 2 < 32767): portable and VNNI-fast, coarser
    "dynamic-s7": Int8Scheme("dynamic", QuantType.QInt8, True,
                             "quantize_dynamic: int8 weights in 7 bits (reduce_range) per output channel, "
                             "uint8 activations per run", reduce_range=True),
    "dynamic-per-tensor": Int8Scheme("dynamic", QuantType.QUInt8, False,
                                     "quantize_dynamic: uint8 weights per tensor, uint8 activations per run"),
    "static": Int8Scheme("static", QuantType.QUInt8, True,
                         "quantize_static QDQ: uint8 weights per channel, uint8 activations with min/max "
                         "ranges from the calibration images"),
}
DEFAULT_SCHEME = "dynamic-u8"


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


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _run_quantizer(s: Int8Scheme, src: Path, dst: Path, to_quantize: list[str],
                   calibration: ActivationCalibrationReader | None) -> None:
    common = dict(op_types_to_quantize=["MatMul"], nodes_to_quantize=to_quantize, per_channel=s.per_channel,
                  weight_type=s.weight_type, reduce_range=s.reduce_range)
    hint_filter = _DropPreprocessHint()
    logging.getLogger().addFilter(hint_filter)
    try:
        if s.method == "dynamic":
            quantize_dynamic(src, dst, **common)
        else:
            quantize_static(src, dst, calibration, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, **common)
    finally:
        logging.getLogger().removeFilter(hint_filter)


def quantize_vision(fp32_path: Path, out_path: Path, scheme: str = DEFAULT_SCHEME,
                    calibration_images: Sequence[ImageSource] | None = None,
                    exclude: Sequence[str] = DEFAULT_EXCLUDE,
                    heldout_images: Sequence[ImageSource] | None = None,
                    n_threads: int | None = None, progress: Progress | None = None,
                    max_piece_bytes: int = DEFAULT_PIECE_BYTES) -> dict:
    """Quantize ``fp32_path`` into ``out_path`` (+ ``.data`` when large) and return the quality report.

    ``calibration_images`` (files or PIL images) calibrate the static scheme and are measured for
    every scheme; without them a generated set is used. ``heldout_images`` default to another
    generated set. Quality is measured on the first ``N_MEASURED_CALIBRATION`` calibration images and
    on the held-out ones. Written in a hidden sibling folder and moved into place: on failure nothing
    is left.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if scheme not in SCHEMES:
        raise QwenVLError(f"unknown INT8 scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if not fp32_path.is_file():
        raise QwenVLError(f"{fp32_path}: FP32 vision model not found")
    s = SCHEMES[scheme]
    say = progress or (lambda _m: None)
    header = onnx.load(str(fp32_path), load_external_data=False)  # graph only: names, not weights
    to_quantize, kept = weight_matmuls(header, exclude)
    external = _has_external_data(header) or fp32_path.stat().st_size > EXTERNAL_DATA_BYTES
    size = header.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    calibration = list(calibration_images) if calibration_images else generate_images(N_CALIBRATION_IMAGES,
                                                                                        CALIBRATION_SEED)
    heldout = list(heldout_images) if heldout_images else generate_images(N_HELDOUT_IMAGES, HELDOUT_SEED)
    log.info("vision int8 (%s): quantizing %d MatMuls, %d kept in float", scheme, len(to_quantize), len(kept))

    calibration_pixels = preprocess_all(calibration, size)  # bad user images fail here, before any work
    sets = {"calibration": calibration_pixels[:N_MEASURED_CALIBRATION], "heldout": preprocess_all(heldout, size)}
    runner = PieceRunner(header.graph.input[0].name, sets, n_threads,
                         extra=calibration_pixels if s.method == "static" else ())
    quantize_set = set(to_quantize)
    with staged_model_files(out_path) as staged, \
            tempfile.TemporaryDirectory(prefix=".int8-pieces.", dir=out_path.parent) as scratch_dir:
        scratch = Path(scratch_dir)
        data_file = open(external_data_path(staged), "wb") if external else None  # noqa: SIM115 (closed below)
        try:
            writer = ExternalDataWriter(data_file, external_data_path(out_path).name) if data_file else None
            assembler = GraphAssembler(header, writer)
            for i, n, piece, model in iter_piece_models(fp32_path, max_piece_bytes):
                say(f"vision int8: piece {i + 1}/{n} ({piece.label}, {piece.nbytes / 2**20:.0f} MiB FP32)")
                fp32_piece, int8_piece = scratch / f"piece{i}_fp32.onnx", scratch / f"piece{i}_int8.onnx"
                onnx.save(model, str(fp32_piece))
                del model
                nodes = [node.name for node in piece.nodes if node.name in quantize_set]
                if nodes:  # an empty list would mean "every node" to the quantizer
                    reader = (ActivationCalibrationReader(runner.calibration_feeds(piece.inputs))
                              if s.method == "static" else None)
                    _run_quantizer(s, fp32_piece, int8_piece, nodes, reader)
                else:
                    shutil.copyfile(fp32_piece, int8_piece)
                runner.run_piece(fp32_piece, int8_piece, piece.inputs, piece.outputs, piece.live_after)
                assembler.add(onnx.load(str(int8_piece)))
                fp32_piece.unlink()
                int8_piece.unlink()
            onnx.save(assembler.model, str(staged))
        finally:
            if data_file:
                data_file.close()
        onnx.checker.check_model(str(staged))
    output = header.graph.output[0].name
    quality = {name: {"images": len(pixels), **compare_rows(*runner.rows(name, output))}
               for name, pixels in sets.items()}
    return {
        "scheme": scheme,
        "method": s.method,
        "weight_type": s.weight_type.name,
        "per_channel": s.per_channel,
        "reduce_range": s.reduce_range,
        "description": s.description,
        **({"caveat": s.caveat} if s.caveat else {}),
        "activation_type": QuantType.QUInt8.name,
        "exclude": list(exclude),
        "quantized_matmuls": len(to_quantize),
        "float_matmuls": len(kept),
        "calibration_images": {"source": "user" if calibration_images else f"generated (seed {CALIBRATION_SEED})",
                               "count": len(calibration)},
        "quality": quality,
    }
