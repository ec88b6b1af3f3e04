"""Qwen-VL-Chat's forward pass in torch, over a flat dict of tensors named as in the checkpoint.

Training only (the package never imports torch). It follows ../shared/SPEC-qwen-vl.md step by
step and is checked against ``tests/golden/tiny`` (the original implementation's outputs) by
``training/check_golden.py``, so what training optimises is what the exported bundle computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


def _ln(x: torch.Tensor, p: Params, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], 1e-6)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def resize_pos(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[n*n, C] table -> [grid*grid, C] by bicubic interpolation (align_corners false)."""
    n = math.isqrt(pos.shape[0])
    img = pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(grid * grid, -1)


def tower(p: Params, pixels: torch.Tensor, heads: int, patch: int = 14) -> torch.Tensor:
    """[B, 3, S, S] pixels -> [B, g*g, W] ViT outputs, patches row-major (conv1, positions, ln_pre, blocks)."""
    v = "transformer.visual."
    x = F.conv2d(pixels, p[v + "conv1.weight"], stride=patch)  # [B, W, g, g]
    b, w, g, _ = x.shape
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, W], row-major patches
    x = x + resize_pos(p[v + "positional_embedding"], g)
    x = _ln(x, p, v + "ln_pre")
    hd = w // heads
    n_layers = sum(1 for k in p if k.startswith(v + "transformer.resblocks.") and k.endswith(".ln_1.weight"))
    for i in range(n_layers):
        r = f"{v}transformer.resblocks.{i}."
        h = _ln(x, p, r + "ln_1")
        qkv = F.linear(h, p[r + "attn.in_proj.weight"], p[r + "attn.in_proj.bias"])
        qkv = qkv.view(b, -1, heads, 3 * hd).transpose(1, 2)  # rows grouped per head: [q_h | k_h | v_h]
        q, k, val = qkv.split(hd, dim=-1)
        a = F.scaled_dot_product_attention(q, k, val).transpose(1, 2).reshape(b, -1, w)
        x = x + F.linear(a, p[r + "attn.out_proj.weight"], p[r + "attn.out_proj.bias"])
        h = _ln(x, p, r + "ln_2")
        h = F.gelu(F.linear(h, p[r + "mlp.c_fc.weight"], p[r + "mlp.c_fc.bias"]))
        x = x + F.linear(h, p[r + "mlp.c_proj.weight"], p[r + "mlp.c_proj.bias"])
    return x


def vision(p: Params, pixels: torch.Tensor, heads: int, patch: int = 14,
           tower_fn: Callable[..., torch.Tensor] = tower) -> torch.Tensor:
    """[B, 3, S, S] pixels -> [B, 256, D] rows (ViT, cross-attention adapter, ln_post, proj).

    ``tower_fn`` computes the ViT (``train.py --grid`` passes ``grid_tower.real_tower``)."""
    v = "transformer.visual."
    x = tower_fn(p, pixels, heads, patch)
    b, g = x.shape[0], math.isqrt(x.shape[1])
    a = v + "attn_pool."
    d = p[a + "query"].shape[1]
    kv = _ln(F.linear(x, p[a + "kv_proj.weight"]), p, a + "ln_kv")  # [B, g*g, D]
    q = _ln(p[a + "query"], p, a + "ln_q")  # [256, D]
    wq, wk, wv = p[a + "attn.in_proj_weight"].chunk(3)
    bq, bk, bv = p[a + "attn.in_proj_bias"].chunk(3)
    ah = d // 128
    qh = F.linear(q + p[a + "pos_embed"], wq, bq).view(1, -1, ah, 128).transpose(1, 2)
    kh = F.linear(kv + resize_pos(p[a + "pos_embed"], g), wk, bk).view(b, -1, ah, 128).transpose(1, 2)
    vh = F.linear(kv, wv, bv).view(b, -1, ah, 128).transpose(1, 2)
    o = F.scaled_dot_product_attention(qh.expand(b, -1, -1, -1), kh, vh).transpose(1, 2).reshape(b, -1, d)
    o = F.linear(o, p[a + "attn.out_proj.weight"], p[a + "attn.out_proj.bias"])
    return _ln(o, p, v + "ln_post") @ p[v + "proj"]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def decoder_hidden(p: Params, embeds: torch.Tensor, heads: int, eps: float = 1e-6,
                   base: float = 10000.0, qk: list | None = None) -> torch.Tensor:
    """[B, T, H] input embeddings -> [B, T, H] final hidden states (after ln_f), causal, positions 0..T-1.

    ``qk``, when given, receives each layer's rotated (queries, keys) [B, heads, T, hd] (training's
    attention loss)."""
    b, t, hsz = embeds.shape
    hd = hsz // heads
    inv = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos(), ang.sin()
    x = embeds
    n_layers = sum(1 for k in p if k.startswith("transformer.h.") and k.endswith(".ln_1.weight"))
    for i in range(n_layers):
        r = f"transformer.h.{i}."
        h = _rms(x, p[r + "ln_1.weight"], eps)
        qkv = F.linear(h, p[r + "attn.c_attn.weight"], p[r + "attn.c_attn.bias"])
        q, k, v = (z.view(b, t, heads, hd).transpose(1, 2) for z in qkv.split(hsz, dim=-1))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if qk is not None:
            qk.append((q, k))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, hsz)
        x = x + F.linear(a, p[r + "attn.c_proj.weight"])
        h = _rms(x, p[r + "ln_2.weight"], eps)
        x = x + F.linear(F.linear(h, p[r + "mlp.w1.weight"]) * F.silu(F.linear(h, p[r + "mlp.w2.weight"])),
                         p[r + "mlp.c_proj.weight"])
    return _rms(x, p["transformer.ln_f.weight"], eps)
