"""A Qwen-VL vision tower whose attention heads each look at one neighbouring patch (a development tool).

Why: a plain ViT of this size learns to read a sign far slower than a small CNN (README, "The tiny
trained model"): the CNN combines neighbouring patches from the start. Here each head of block 0
attends to one of the 8 patches around it and each head of block 1 to one of the 8 patches two away,
so the two blocks are a 3 x 3 and a dilated 3 x 3 convolution on the patch grid, built from the real
architecture's own parts:

- the last ``N_CODE`` dimensions of the residual stream hold a cos/sin code of each patch's column and
  row (periods 32, 16 and 8 patches) and its negative (so the code adds nothing to a LayerNorm's mean),
  written there by the position table through the checkpoint's bicubic resize and kept large by
  ``ln_pre``; no block writes into them and only the queries and keys read them, so everything else
  is the same at every place of the picture (a convolution);
- head h's queries are that code rotated by the head's offset, its keys the code itself, so its
  scores peak at the patch ``offset`` away (wrapping around the grid edge, since every period divides
  32) with a margin that makes the softmax one-hot to about 1e-4.

``tower_reads.py grid`` trains the cheap form (``shift_tower``: each head's attention is an exact
roll of its values, no 1,024 x 1,024 scores). ``real_params`` writes the queries and keys that make
the real attention do the same, and ``train.py --grid`` trains ``real_tower`` (the real attention over
those tensors), so the exported checkpoint is an ordinary Qwen-VL vision tower that computes what was
trained. The two forms drift apart as training grows the content against the code (the softmax
scores scale with each key's LayerNorm), which ``python training/grid_tower.py FILE`` measures.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from model import _ln, resize_pos, tower

V = "transformer.visual."
N_CODE = 24  # cos, sin x 3 periods x (column, row), then all of it negated
SIDE = 32  # patches per side: 448 px / 14 px
PERIODS = (32, 16, 8)  # patches; each divides SIDE, so the code wraps around the grid exactly
POS_SCALE = 30.0  # the code's size in the position table: it dominates ln_pre's statistics
PRE_GAIN = 48.0  # ln_pre's weight on the code dimensions
QK_GAIN = 3.5  # query and key gain on the LayerNorm'd code: margin about 11 nats to the next patch
LN1_GAIN = 4.0  # ln_1's weight on the code (the queries and keys divide it out): the code, not the content,
# sets the range of ln_1's output, which INT8 quantizes per tensor
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # (rows, columns)


def grid_code(g: int) -> torch.Tensor:
    """[g*g, N_CODE] code of each patch (row-major): cos, sin of each period for the column, then the row."""
    idx = torch.arange(g * g)
    out = []
    for u in (idx % g, idx // g):
        for period in PERIODS:
            a = 2 * math.pi * u.double() / period
            out += [a.cos(), a.sin()]
    code = torch.stack(out, -1)
    return torch.cat([code, -code], -1)


def rotation(dy: int, dx: int) -> torch.Tensor:
    """[N_CODE / 2, N_CODE / 2]: the code of patch (r, c) -> the code of patch (r + dy, c + dx)."""
    rot = torch.zeros(N_CODE // 2, N_CODE // 2, dtype=torch.float64)
    for a, d in enumerate((dx, dy)):
        for f, period in enumerate(PERIODS):
            t = 2 * math.pi * d / period
            i = 2 * (a * len(PERIODS) + f)
            rot[i:i + 2, i:i + 2] = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return rot


@cache
def position_table(n: int, g: int) -> torch.Tensor:
    """[n*n, N_CODE] table whose bicubic resize to g x g is closest to ``grid_code(g)`` (least squares)."""
    resize = resize_pos(torch.eye(n * n, dtype=torch.float64), g)  # [g*g, n*n]: resize is linear
    return torch.linalg.lstsq(resize, grid_code(g)).solution


def masks(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """1 where training may change a tensor, 0 on what carries the code (zero or fixed values)."""
    w = p[V + "conv1.weight"].shape[0]
    content = torch.ones(w)
    content[w - N_CODE:] = 0
    m = {V + "conv1.weight": content[:, None, None, None], V + "positional_embedding": content,
         V + "ln_pre.weight": content, V + "ln_pre.bias": content}
    for k in p:
        if ".resblocks." in k:
            if k.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
                m[k] = content[:, None]
            elif k.endswith("mlp.c_fc.weight"):
                m[k] = content[None, :]
            elif k.endswith("attn.in_proj.weight"):  # values read no code (queries and keys: real_params)
                m[k] = content[None, :].expand(p[k].shape[0], w).clone()
            elif k.endswith(("attn.out_proj.bias", "mlp.c_proj.bias", "ln_1.weight", "ln_1.bias")):
                m[k] = content
    return m


def fixed(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fixed values under ``masks`` (added to the masked trainable tensors)."""
    w = p[V + "conv1.weight"].shape[0]
    n = math.isqrt(p[V + "positional_embedding"].shape[0])
    code = torch.zeros(w)
    code[w - N_CODE:] = 1
    pos = torch.zeros_like(p[V + "positional_embedding"])
    pos[:, w - N_CODE:] = POS_SCALE * position_table(n, SIDE).float()
    f = {V + "positional_embedding": pos, V + "ln_pre.weight": PRE_GAIN * code}
    for k in p:
        if ".resblocks." in k and k.endswith("ln_1.weight"):
            f[k] = LN1_GAIN * code
    return f


def effective(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tower's tensors as the forward pass uses them: trainable parts masked, fixed parts added."""
    m, f = masks(p), fixed(p)
    out = dict(p)
    for k, mk in m.items():
        out[k] = p[k] * mk + f.get(k, 0)
    return out


def n_layers(p: dict[str, torch.Tensor]) -> int:
    return sum(1 for k in p if k.startswith(V + "transformer.resblocks.") and k.endswith(".ln_1.weight"))


def shift_tower(p: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int, patch: int = 14) -> torch.Tensor:
    """``model.tower`` with each head's attention replaced by the exact roll it is built to do."""
    p = effective(p)
    x = F.conv2d(pixels, p[V + "conv1.weight"], stride=patch)
    b, w, g, _ = x.shape
    x = x.flatten(2).transpose(1, 2) + resize_pos(p[V + "positional_embedding"], g)
    x = _ln(x, p, V + "ln_pre")
    hd = w // heads
    for i in range(n_layers(p)):
        r = f"{V}transformer.resblocks.{i}."
        h = _ln(x, p, r + "ln_1")
        wv = p[r + "attn.in_proj.weight"].view(heads, 3, hd, w)[:, 2].reshape(w, w)
        bv = p[r + "attn.in_proj.bias"].view(heads, 3, hd)[:, 2].reshape(w)
        val = F.linear(h, wv, bv).view(b, g, g, heads, hd)
        step = i + 1
        a = torch.stack([val[..., k, :].roll((-dy * step, -dx * step), dims=(1, 2))
                         for k, (dy, dx) in enumerate(OFFSETS[:heads])], dim=3).reshape(b, g * g, w)
        x = x + F.linear(a, p[r + "attn.out_proj.weight"], p[r + "attn.out_proj.bias"])
        h = _ln(x, p, r + "ln_2")
        h = F.gelu(F.linear(h, p[r + "mlp.c_fc.weight"], p[r + "mlp.c_fc.bias"]))
        x = x + F.linear(h, p[r + "mlp.c_proj.weight"], p[r + "mlp.c_proj.bias"])
    return x


def real_params(p: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """The tower's tensors for the real architecture: ``effective`` values plus the query and key rows
    that make head k of block i attend to the patch ``OFFSETS[k] * (i + 1)`` away (differentiable in
    everything else, so training can also run the real attention: ``real_tower``)."""
    out = effective(p)
    w = out[V + "conv1.weight"].shape[0]
    hd = w // heads
    if heads != len(OFFSETS) or hd < N_CODE // 2:
        raise ValueError(f"needs {len(OFFSETS)} heads of at least {N_CODE // 2} dimensions")
    half, plus, minus = N_CODE // 2, slice(w - N_CODE, w - N_CODE // 2), slice(w - N_CODE // 2, w)
    for i in range(n_layers(p)):
        r = f"{V}transformer.resblocks.{i}."
        qk = torch.zeros(heads, 2, hd, w)
        for k, (dy, dx) in enumerate(OFFSETS):
            for j, read in enumerate((rotation(dy * (i + 1), dx * (i + 1)).float(), torch.eye(half))):
                # (code - negated code) / 2: a shift LayerNorm gives every code dimension cancels
                qk[k, j, :half, plus] = QK_GAIN / LN1_GAIN / 2 * read
                qk[k, j, :half, minus] = -QK_GAIN / LN1_GAIN / 2 * read
        wt = out[r + "attn.in_proj.weight"].view(heads, 3, hd, w)
        bt = out[r + "attn.in_proj.bias"].view(heads, 3, hd)
        out[r + "attn.in_proj.weight"] = torch.cat([qk, wt[:, 2:]], 1).reshape(3 * w, w)
        out[r + "attn.in_proj.bias"] = torch.cat([torch.zeros(heads, 2, hd), bt[:, 2:]], 1).reshape(3 * w)
    return out


def real_tower(p: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int, patch: int = 14) -> torch.Tensor:
    """``model.tower`` on ``real_params``: exactly what the exported checkpoint computes."""
    return tower(real_params(p, heads), pixels, heads, patch)


def load_tower(path: Path, p: dict[str, torch.Tensor]) -> None:
    """Copy a grid tower saved by ``tower_reads.py grid --save`` into ``p``; ValueError (one line) for
    a file that is not one, or not of this size."""
    try:
        saved = torch.load(path)  # weights_only: a hostile pickle is refused, not run
        if not saved or any(k not in p or p[k].shape != v.shape for k, v in saved.items()):
            raise ValueError("other tensors")
    except Exception as e:
        raise ValueError(f"{path}: not a grid tower of this size ({type(e).__name__})") from None
    with torch.no_grad():
        for k, v in saved.items():
            p[k].copy_(v)


def start(p: dict[str, torch.Tensor]) -> None:
    """Adjust the recipe's init (``train.init_params``) for a grid tower, in place.

    The code dominates every LayerNorm's variance (that keeps the attention one-hot), so the norms'
    content weights are scaled up by the code's share of their statistics, or the content would leave
    each norm several times smaller than it came in. The position table's content part starts at zero
    (positions live in the code) and the blocks' output projections start small, so the tower starts
    as its patch embedding and grows its neighbour terms (64 signs were fitted about twice as fast).
    """
    w = p[V + "conv1.weight"].shape[0]
    share = math.sqrt(N_CODE / 2 / w)  # the code's root-mean-square per dimension, per unit of its size
    with torch.no_grad():
        p[V + "positional_embedding"][:, :w - N_CODE] = 0  # positions only in the code: a convolution
        p[V + "ln_pre.weight"][:w - N_CODE] *= POS_SCALE * share
        for k in p:
            if ".resblocks." in k and k.endswith(("ln_1.weight", "ln_2.weight")):
                p[k][:w - N_CODE] *= PRE_GAIN
            if ".resblocks." in k and k.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
                p[k] *= 0.05


def main() -> None:
    """Compare the cheap and the real form on a few task images (a saved tower, or the init)."""
    import argparse
    import sys

    import numpy as np
    import train

    from qwenvl_edge.evaluation import task_images as T
    from qwenvl_edge.runtime.preprocess import preprocess_image

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("tower_file", nargs="?", type=Path, help="written by `tower_reads.py grid --save`")
    args = ap.parse_args()
    if args.tower_file and not args.tower_file.is_file():
        sys.exit(f"error: {args.tower_file}: no such file")
    train.OVERRIDES["visual"]["heads"] = len(OFFSETS)
    tr = train.Trainer(argparse.Namespace(heldout=1))
    start(tr.p)
    if args.tower_file:
        try:
            load_tower(args.tower_file, tr.p)
        except ValueError as e:
            sys.exit(f"error: {e}")
    images = [s.image for task in T.TASKS for s in T.make_set(task, 4, 5)]
    pixels = torch.from_numpy(np.stack([preprocess_image(im) for im in images]))
    with torch.no_grad():
        cheap = shift_tower(tr.p, pixels, len(OFFSETS))[..., :-N_CODE]
        real = real_tower(tr.p, pixels, len(OFFSETS))[..., :-N_CODE]
    err = (real - cheap).norm(dim=-1) / cheap.norm(dim=-1)
    print(f"real attention vs rolls, relative error per patch: mean {err.mean():.2%}, "
          f"99th percentile {err.quantile(0.99):.2%}, max {err.max():.2%}")


if __name__ == "__main__":
    main()
