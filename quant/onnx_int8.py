"""INT8 vision graph: a separate pass of onnxruntime.quantization over the finished FP32 file.

Only the weight MatMuls are quantized (each ``MatMul`` whose B input is an initializer): the
attention score/context products, LayerNorms, GELU and softmax stay in float, and so does the
patch-embedding Conv (under 0.1% of the compute; quantizing it changed nothing measurable).
``exclude`` keeps more nodes in float by node-name prefix. By default that is the adapter and
the final projection: 2.6% of the FLOPs at full size, but the adapter's kv_proj reads the raw
residual stream (no LayerNorm before it), where real ViTs keep their outlier channels, and on
the tiny golden leaving them in float lifts the worst row cosine from 0.9993 to 0.9997.

Every call measures itself: the returned dict holds the scheme and the FP32-vs-INT8 row quality on
the calibration images and on held-out ones (``quant.vision_quality``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.export.onnx_builder import staged_model_files
from qwenvl_edge.quant.calibration import CALIBRATION_SEED, HELDOUT_SEED, ImageCalibrationReader, generate_images
from qwenvl_edge.quant.vision_quality import measure_vision_quality
from qwenvl_edge.runtime.preprocess import ImageSource

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 2_000_000_000  # as the FP32 export: above this the weights go to <out>.data
N_CALIBRATION_IMAGES = 8
N_HELDOUT_IMAGES = 4
N_MEASURED_CALIBRATION = 4  # quality is measured on this many calibration images (each costs two full runs)
DEFAULT_EXCLUDE = ("/visual/adapter/", "/visual/proj/")


@dataclass(frozen=True)
class Int8Scheme:
    """One way to call onnxruntime.quantization on the vision graph."""

    method: str  # "dynamic" (activations quantized at run time) | "static" (QDQ, calibrated ranges)
    weight_type: QuantType
    per_channel: bool
    description: str


SCHEMES: dict[str, Int8Scheme] = {
    # int8 x uint8 products use VNNI (x86) / dot-product (ARM) kernels: the fastest on current CPUs
    "dynamic": Int8Scheme("dynamic", QuantType.QInt8, True,
                          "quantize_dynamic: int8 weights per output channel, uint8 activations per run"),
    # for AVX2 CPUs without VNNI, where int8 x uint8 sums can saturate in 16 bits; ~40% slower elsewhere
    "dynamic-u8": Int8Scheme("dynamic", QuantType.QUInt8, True,
                             "quantize_dynamic: uint8 weights per output channel, uint8 activations per run"),
    "dynamic-per-tensor": Int8Scheme("dynamic", QuantType.QUInt8, False,
                                     "quantize_dynamic: uint8 weights per tensor, uint8 activations per run"),
    "static": Int8Scheme("static", QuantType.QInt8, True,
                         "quantize_static QDQ: int8 weights per channel, uint8 activations with min/max "
                         "ranges from the calibration images"),
}
DEFAULT_SCHEME = "dynamic"


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


def _run_quantizer(s: Int8Scheme, fp32_path: Path, out_path: Path, to_quantize: list[str], external: bool,
                   calibration: Sequence[ImageSource]) -> None:
    common = dict(op_types_to_quantize=["MatMul"], nodes_to_quantize=to_quantize, per_channel=s.per_channel,
                  weight_type=s.weight_type, use_external_data_format=external)
    hint_filter = _DropPreprocessHint()
    logging.getLogger().addFilter(hint_filter)
    try:
        if s.method == "dynamic":
            quantize_dynamic(fp32_path, out_path, **common)
        else:
            quantize_static(fp32_path, out_path, ImageCalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, **common)
    finally:
        logging.getLogger().removeFilter(hint_filter)


def quantize_vision(fp32_path: Path, out_path: Path, scheme: str = DEFAULT_SCHEME,
                    calibration_images: Sequence[ImageSource] | None = None,
                    exclude: Sequence[str] = DEFAULT_EXCLUDE,
                    heldout_images: Sequence[ImageSource] | None = None,
                    n_threads: int | None = None) -> dict:
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
    header = onnx.load(str(fp32_path), load_external_data=False)  # graph only: names, not weights
    to_quantize, kept = weight_matmuls(header, exclude)
    external = _has_external_data(header) or fp32_path.stat().st_size > EXTERNAL_DATA_BYTES
    del header
    calibration = list(calibration_images) if calibration_images else generate_images(N_CALIBRATION_IMAGES,
                                                                                        CALIBRATION_SEED)
    heldout = list(heldout_images) if heldout_images else generate_images(N_HELDOUT_IMAGES, HELDOUT_SEED)
    log.info("vision int8 (%s): quantizing %d MatMuls, %d kept in float", scheme, len(to_quantize), len(kept))

    with staged_model_files(out_path) as staged:  # the final name, so the .data location inside is right
        _run_quantizer(s, fp32_path, staged, to_quantize, external, calibration)
        measured = {"calibration": calibration[:N_MEASURED_CALIBRATION], "heldout": heldout}
        quality = measure_vision_quality(fp32_path, staged, measured, n_threads)
    return {
        "scheme": scheme,
        "method": s.method,
        "weight_type": s.weight_type.name,
        "per_channel": s.per_channel,
        "description": s.description,
        "activation_type": QuantType.QUInt8.name,
        "exclude": list(exclude),
        "quantized_matmuls": len(to_quantize),
        "float_matmuls": len(kept),
        "calibration_images": {"source": "user" if calibration_images else f"generated (seed {CALIBRATION_SEED})",
                               "count": len(calibration)},
        "quality": quality,
    }
