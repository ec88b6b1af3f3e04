"""The names of the quantization types: the LLM types of ``--llm`` and the vision INT8 schemes.

Stdlib only: the CLI builds ``--llm`` and ``--vision-scheme`` (their choices and help) from these
for every command, so they may not live in ``gguf_quant`` / ``onnx_int8``, which import gguf,
llama_cpp and onnx. Those modules import the registries from here and turn the names into the
engines' own values (``gguf.LlamaFileType[...]``, ``QuantType[...]``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Names accepted by ``--llm``, and the ``gguf.LlamaFileType`` member each one asks for: every type llama.cpp's
# quantizer makes without an importance matrix (IQ1_*, IQ2_*, Q2_K_S refuse to run without one; IQ3_*
# run but are meant for one; TQ1_0/TQ2_0 suit only ternary-trained models; MXFP4 only MoE experts).
LLM_FILE_TYPES: dict[str, str] = {
    "Q4_K_M": "MOSTLY_Q4_K_M",  # the default: first, so listings start with it
    "Q2_K": "MOSTLY_Q2_K",
    "Q3_K_S": "MOSTLY_Q3_K_S",
    "Q3_K_M": "MOSTLY_Q3_K_M",
    "Q3_K_L": "MOSTLY_Q3_K_L",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q4_K_S": "MOSTLY_Q4_K_S",
    "IQ4_NL": "MOSTLY_IQ4_NL",
    "IQ4_XS": "MOSTLY_IQ4_XS",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q5_K_S": "MOSTLY_Q5_K_S",
    "Q5_K_M": "MOSTLY_Q5_K_M",
    "Q6_K": "MOSTLY_Q6_K",
    "Q8_0": "MOSTLY_Q8_0",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "F32": "ALL_F32",
}
DEFAULT_LLM_TYPE = next(iter(LLM_FILE_TYPES))
FLOAT_LLM_TYPES = ("F32", "F16", "BF16")  # written by the float GGUF stage itself: nothing to quantize

S8_CAVEAT = ("int8 weights: fastest on CPUs with VNNI or ARM dot-product, but on AVX2-only x86 CPUs "
             "(no VNNI) onnxruntime's 16-bit sums saturate and the rows lose accuracy")


@dataclass(frozen=True)
class Int8Scheme:
    """One way to quantize the vision graph's weight MatMuls (``quant.matmul_rewrite``, or onnxruntime's
    ``quantize_static`` for the calibrated QDQ scheme)."""

    method: str  # "dynamic" (activations quantized at run time) | "static" (QDQ, calibrated ranges) | "nbits"
    weight_type: str  # the name of an ``onnxruntime.quantization.QuantType`` member
    per_channel: bool
    description: str
    min_cosine: float  # the worst row cosine vs FP32 it keeps on the golden images (tests hold it; README's table)
    caveat: str = ""  # printed by the export when the scheme's quality depends on the CPU that runs it
    reduce_range: bool = False
    bits: int = 8  # "nbits" (MatMulNBits): weight bits, block size along K, accuracy level (4: int8 products)
    block_size: int = 0
    accuracy_level: int = 0


SCHEMES: dict[str, Int8Scheme] = {
    # the default: u8 x u8 is exact on every CPU (see onnx_int8's module docstring)
    "dynamic-u8": Int8Scheme("dynamic", "QUInt8", True,
                             "DynamicQuantizeMatMul: uint8 weights per output channel, uint8 activations per run",
                             0.999),
    # int8 x uint8 products use VNNI / AMX (x86) and dot-product (ARM) kernels: the fastest there
    "dynamic": Int8Scheme("dynamic", "QInt8", True,
                          "DynamicQuantizeMatMul: int8 weights per output channel, uint8 activations per run",
                          0.95, caveat=S8_CAVEAT),  # 0.999 with VNNI or on ARM; saturated sums on AVX2 only
    # 7-bit int8 weights cannot saturate 16-bit sums (255 x 64 x 2 < 32767): portable and VNNI-fast, coarser
    "dynamic-s7": Int8Scheme("dynamic", "QInt8", True,
                             "DynamicQuantizeMatMul: int8 weights in 7 bits per output channel, uint8 activations "
                             "per run", 0.998, reduce_range=True),
    "dynamic-per-tensor": Int8Scheme("dynamic", "QUInt8", False,
                                     "DynamicQuantizeMatMul: uint8 weights per tensor, uint8 activations per run",
                                     0.999),
    "static": Int8Scheme("static", "QUInt8", True,
                         "quantize_static QDQ: uint8 weights per channel, uint8 activations with min/max "
                         "ranges from the calibration images", 0.999),
    **{f"nbits{bits}-b{block}": Int8Scheme(
        "nbits", "QInt8" if bits == 8 else "QInt4", False,
        f"MatMulNBits: int{bits} weights in blocks of {block} along K (symmetric), accuracy_level 4 "
        "(int8 activations per block)" + ("" if bits == 8 else "; 4 bits, for reference: below the 0.99 floor "
                                                               "on every tower measured, so the export keeps "
                                                               "its MatMuls in float"),
        0.999 if bits == 8 else 0.99, bits=bits, block_size=block, accuracy_level=4)
       for bits in (8, 4) for block in (32, 128)},
}
DEFAULT_SCHEME = "dynamic-u8"

# The worst INT8-vs-FP32 row cosine the export accepts on its calibration images (``--int8-floor``): below it
# the most sensitive weight MatMuls stay in float until it holds (``onnx_int8.quantize_vision``).
DEFAULT_INT8_FLOOR = 0.99


def check_int8_floor(value: object) -> float:
    """``--int8-floor``: a number in (0, 1]; raises ``ValueError`` with the one-line reason."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) <= 1:
        raise ValueError(f"--int8-floor must be a number in (0, 1] (a row cosine), got {value!r}")
    return float(value)
