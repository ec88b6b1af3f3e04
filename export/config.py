"""Typed view of a Qwen-VL ``config.json``: every size comes from the file, never from constants.

Field names are the ``config.json`` keys verbatim; derived sizes are properties. The
``tensor_shapes`` table is the one place that says which tensors a checkpoint of this
architecture holds and with which shapes: the reader validates against it and the
synthetic-checkpoint writer produces from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

from qwenvl_edge.contract import IMAGE_SIZE, IMAGE_START_ID, N_QUERIES  # N_QUERIES: not in config.json
from qwenvl_edge.errors import CheckpointError
from qwenvl_edge.validate import json_file

GRID_QUERIES = 16
MAX_SIZE = 2**24  # no Qwen-VL size comes near this; larger ones are corrupt files, not models
ZERO_ALLOWED = {"kv_channels", "image_start_id"}  # 0 = "not given" / a plain id
MAX_LAYERS = 1024  # Qwen-VL has 32 + 48; the tensor table holds ~10 entries per layer
LAYER_FIELDS = {"num_hidden_layers", "layers"}


def _check_value(name: str, kind: str, value: Any, where: str) -> None:
    """One config field against its declared type: ints are sizes (1 .. MAX_SIZE), floats finite and positive."""
    if kind == "int":
        low = 0 if name in ZERO_ALLOWED else 1
        high = MAX_LAYERS if name in LAYER_FIELDS else MAX_SIZE
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(f"{where}: {name} must be an integer in [{low}, {high}], got {value!r:.40}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 < float(value) < math.inf:
            raise CheckpointError(f"{where}: {name} must be a positive finite number, got {value!r:.40}")
    elif kind == "bool" and not isinstance(value, bool):
        raise CheckpointError(f"{where}: {name} must be true or false, got {value!r:.40}")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: must be a JSON object, got {type(data).__name__}: not a Qwen-VL config")
    fields = dataclasses.fields(cls)
    required = {f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - data.keys())
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {', '.join(missing)}: not a Qwen-VL config")
    for f in fields:
        if f.name in data:
            _check_value(f.name, str(f.type), data[f.name], where)
    try:
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})
    except CheckpointError as e:  # the sizes' cross-checks: name the file too
        raise CheckpointError(f"{where}: {e}") from None


@dataclass(frozen=True)
class VisualConfig:
    """The ``visual`` block: ViT sizes and the adapter's output width."""

    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float
    image_size: int = IMAGE_SIZE
    patch_size: int = 14
    image_start_id: int = IMAGE_START_ID

    def __post_init__(self) -> None:
        if self.mlp_width < 1:
            raise CheckpointError(f"visual.width {self.width} x mlp_ratio {self.mlp_ratio} leaves no MLP")
        if self.width % self.heads:
            raise CheckpointError(f"visual.width {self.width} is not divisible by visual.heads {self.heads}")
        if self.image_size % self.patch_size:
            raise CheckpointError(
                f"visual.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.output_dim % 128:
            raise CheckpointError(f"visual.output_dim {self.output_dim} is not a multiple of 128 (adapter heads)")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Patches per side (32 at 448 px)."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def adapter_heads(self) -> int:
        return self.output_dim // 128

    @property
    def n_queries(self) -> int:
        return N_QUERIES


@dataclass(frozen=True)
class QwenConfig:
    """The LLM sizes plus the nested visual config."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    visual: VisualConfig
    kv_channels: int = 0
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 2048
    tie_word_embeddings: bool = False
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"hidden_size {self.hidden_size} is not divisible by "
                                  f"num_attention_heads {self.num_attention_heads}")
        if self.kv_channels and self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise CheckpointError(f"kv_channels {self.kv_channels} x heads {self.num_attention_heads} "
                                  f"!= hidden_size {self.hidden_size}")
        if self.visual.output_dim != self.hidden_size:
            raise CheckpointError(f"visual.output_dim {self.visual.output_dim} != hidden_size {self.hidden_size}")
        if self.intermediate_size % 2:
            raise CheckpointError(f"intermediate_size {self.intermediate_size} is odd")
        if self.rotary_pct != 1.0:
            raise CheckpointError(f"rotary_pct {self.rotary_pct} is not supported (Qwen-VL uses 1.0)")
        if self.tie_word_embeddings:
            raise CheckpointError("tie_word_embeddings is true: Qwen-VL-Chat has an untied lm_head")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def n_ff(self) -> int:
        """Width of each MLP branch (w1, w2): half of ``intermediate_size``."""
        return self.intermediate_size // 2

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> QwenConfig:
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: not a JSON object")
        if data.get("model_type") not in (None, "qwen") or "visual" not in data:
            raise CheckpointError(f"{where}: not a Qwen-VL config (model_type "
                                  f"{data.get('model_type')!r}, visual block {'visual' in data})")
        visual = _from_dict(VisualConfig, data["visual"], f"{where} visual")
        return _from_dict(cls, {**data, "visual": visual}, where)

    @classmethod
    def from_file(cls, path: Path) -> QwenConfig:
        if not Path(path).exists():
            raise CheckpointError(f"{path}: no config.json: not a Qwen-VL checkpoint folder")
        return cls.from_dict(json_file(path, CheckpointError, "config"), str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the architecture, in the order the original checkpoint lists them."""
        h, v, ff = self.hidden_size, self.vocab_size, self.n_ff
        vis = self.visual
        w, d, m = vis.width, vis.output_dim, vis.mlp_width
        s: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, h)}
        for i in range(self.num_hidden_layers):
            b = f"transformer.h.{i}."
            s[b + "ln_1.weight"] = (h,)
            s[b + "attn.c_attn.weight"] = (3 * h, h)
            s[b + "attn.c_attn.bias"] = (3 * h,)
            s[b + "attn.c_proj.weight"] = (h, h)
            s[b + "ln_2.weight"] = (h,)
            s[b + "mlp.w1.weight"] = (ff, h)
            s[b + "mlp.w2.weight"] = (ff, h)
            s[b + "mlp.c_proj.weight"] = (h, ff)
        s["transformer.ln_f.weight"] = (h,)
        p = "transformer.visual."
        s[p + "positional_embedding"] = (N_QUERIES, w)
        s[p + "proj"] = (d, d)
        s[p + "conv1.weight"] = (w, 3, vis.patch_size, vis.patch_size)
        s[p + "ln_pre.weight"] = (w,)
        s[p + "ln_pre.bias"] = (w,)
        for i in range(vis.layers):
            b = f"{p}transformer.resblocks.{i}."
            s[b + "ln_1.weight"] = (w,)
            s[b + "ln_1.bias"] = (w,)
            s[b + "attn.in_proj.weight"] = (3 * w, w)
            s[b + "attn.in_proj.bias"] = (3 * w,)
            s[b + "attn.out_proj.weight"] = (w, w)
            s[b + "attn.out_proj.bias"] = (w,)
            s[b + "ln_2.weight"] = (w,)
            s[b + "ln_2.bias"] = (w,)
            s[b + "mlp.c_fc.weight"] = (m, w)
            s[b + "mlp.c_fc.bias"] = (m,)
            s[b + "mlp.c_proj.weight"] = (w, m)
            s[b + "mlp.c_proj.bias"] = (w,)
        a = p + "attn_pool."
        s[a + "pos_embed"] = (N_QUERIES, d)
        s[a + "query"] = (N_QUERIES, d)
        s[a + "kv_proj.weight"] = (d, w)
        s[a + "attn.in_proj_weight"] = (3 * d, d)
        s[a + "attn.in_proj_bias"] = (3 * d,)
        s[a + "attn.out_proj.weight"] = (d, d)
        s[a + "attn.out_proj.bias"] = (d,)
        s[a + "ln_q.weight"] = (d,)
        s[a + "ln_q.bias"] = (d,)
        s[a + "ln_kv.weight"] = (d,)
        s[a + "ln_kv.bias"] = (d,)
        s[p + "ln_post.weight"] = (d,)
        s[p + "ln_post.bias"] = (d,)
        s["lm_head.weight"] = (v, h)
        return s

    def n_params(self) -> int:
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())
