"""How fast a vision tower learns to read a sign, measured on the tower alone (a development tool).

The tiny model does not read (README, "The tiny trained model"): is that the tower or the rest of the
recipe? This trains one thing with one loss: the mean of the tower's outputs over the sign's patches,
through a linear layer, must name the word (16 words: chance 6.25 %). It prints the held-out
accuracy (160 signs of another seed) every 25 steps. Towers:

- ``plain``: the ViT as the training recipe starts it (``init_params``);
- ``grid``: the same architecture with 8 heads, each attending to one neighbouring patch
  (``grid_tower.py``: a 3 x 3 and a dilated 3 x 3 convolution made of attention), trained in its
  cheap form;
- ``patch-cnn``: a reference outside the architecture: a patch embedding and two 3 x 3 convolutions
  on the patch grid (what a ViT would have to become to read as fast).

    python training/tower_reads.py plain --batch 32 --minutes 6
    python training/tower_reads.py patch-cnn --batch 32 --minutes 6 --save cnn.pt
    python training/tower_reads.py grid --batch 32 --minutes 13 --teacher cnn.pt --save grid.pt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
from grid_tower import N_CODE, OFFSETS, shift_tower, start  # noqa: E402
from model import tower  # noqa: E402

from qwenvl_edge.evaluation import task_images as T  # noqa: E402
from qwenvl_edge.runtime.preprocess import preprocess_image  # noqa: E402

HELD_SEED, STREAM_SEED, N_HELD, HELD_CHUNK = 12, 99, 160, 40
TOWER = train.TOWER_KEYS


class PatchCNN(nn.Module):
    """Patch embedding (14 px, stride 14), then a 3 x 3 and a dilated 3 x 3 convolution, residual."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Conv2d(3, width, 14, 14)
        self.near = nn.Conv2d(width, width, 3, padding=1)
        self.far = nn.Conv2d(width, width, 3, padding=2, dilation=2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        f = F.gelu(self.embed(pixels))
        f = f + F.gelu(self.near(f))
        f = f + F.gelu(self.far(f))
        return f.flatten(2).transpose(1, 2)  # [B, g*g, W], row-major like the ViT


def batch(samples: list[T.Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels, the sign's patches of the 32 x 32 grid (from its 16 x 16 cells) and the word index."""
    pixels = torch.from_numpy(np.stack([preprocess_image(s.image) for s in samples]))
    cells = np.stack([train.cell_targets(s)[2] > 0 for s in samples]).reshape(-1, train.GRID, 1, train.GRID, 1)
    side = T.SIZE // 14 // train.GRID
    patches = np.broadcast_to(cells, (len(samples), train.GRID, side, train.GRID, side)).reshape(len(samples), -1)
    words = torch.tensor([T.WORDS.index(s.answer) for s in samples])
    return pixels, torch.from_numpy(patches.astype(np.float32)), words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tower", choices=("plain", "grid", "patch-cnn"))
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, help="write the trained patch CNN (a teacher for --teacher) or grid "
                    "tower (a start for train.py --grid) here")
    ap.add_argument("--teacher", type=Path, help="a saved patch CNN: the ViT also learns to predict its "
                    "features at every patch (distillation: 1,024 targets per image instead of one word)")
    args = ap.parse_args()
    if args.minutes <= 0 or args.batch < 1 or args.threads < 1 or args.lr <= 0:
        ap.error("--minutes and --lr must be above 0, --batch and --threads at least 1")
    if args.save and (args.tower == "plain" or not args.save.parent.is_dir()):
        ap.error(f"--save {args.save}: writes a patch CNN (a teacher) or a grid tower into an existing folder")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.tower == "grid":  # one head per neighbouring patch
        train.OVERRIDES["visual"]["heads"] = len(OFFSETS)
    tr = train.Trainer(argparse.Namespace(heldout=1))
    width = tr.cfg.visual.width
    keep = width - N_CODE if args.tower == "grid" else width  # features read out (not the grid's position code)
    if args.tower == "patch-cnn":
        cnn = PatchCNN(width)
        params = list(cnn.parameters())

        def features(pixels: torch.Tensor) -> torch.Tensor:
            return cnn(pixels)
    else:
        params = [v for k, v in tr.p.items() if k.startswith(TOWER)]
        run = shift_tower if args.tower == "grid" else tower
        if args.tower == "grid":
            start(tr.p)

        def features(pixels: torch.Tensor) -> torch.Tensor:
            return run(tr.p, pixels, tr.cfg.visual.heads)[..., :keep]
    head = nn.Linear(keep, len(T.WORDS))
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=args.lr, weight_decay=0.01)

    def logits(feats: torch.Tensor, on_sign: torch.Tensor) -> torch.Tensor:
        return head((feats * on_sign[..., None]).sum(1) / on_sign.sum(1, keepdim=True))

    teacher, student = None, None
    if args.teacher:
        if args.tower == "patch-cnn" or not args.teacher.is_file():
            ap.error("--teacher needs a ViT tower (plain or grid) and a file written by patch-cnn --save")
        teacher = PatchCNN(width)
        try:
            teacher.load_state_dict(torch.load(args.teacher))
        except Exception as e:  # a file of another kind or width: say so in one line
            ap.error(f"--teacher {args.teacher}: not a patch CNN of width {width} ({type(e).__name__})")
        teacher.requires_grad_(False)
        student = nn.Linear(keep, width)  # ViT features -> the teacher's
        opt.add_param_group({"params": list(student.parameters())})

    def distill(pixels: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            return torch.zeros(())
        with torch.no_grad():
            want = teacher(pixels)
            want = want / want.std()
        return F.mse_loss(student(feats), want)

    held = batch(T.make_set("sign", N_HELD, HELD_SEED))

    @torch.no_grad()
    def held_out() -> float:
        right = 0
        for i in range(0, N_HELD, HELD_CHUNK):
            pixels, on_sign, words = (t[i:i + HELD_CHUNK] for t in held)
            right += int((logits(features(pixels), on_sign).argmax(-1) == words).sum())
        return right / N_HELD

    stream = T.samples("sign", STREAM_SEED)
    t0, step = time.monotonic(), 0
    while (time.monotonic() - t0) / 60 < args.minutes:
        pixels, on_sign, words = batch([next(stream) for _ in range(args.batch)])
        feats = features(pixels)
        loss = F.cross_entropy(logits(feats, on_sign), words) + distill(pixels, feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step} ({step * args.batch} images) loss {loss.item():.3f} held-out {held_out():.1%} "
                  f"{(time.monotonic() - t0) / 60:.1f} min", flush=True)
    print(f"{args.tower}: {step * args.batch} images, held-out word read-out {held_out():.1%} "
          f"(chance {1 / len(T.WORDS):.1%})")
    if args.save:  # whole or not at all: an interrupted save leaves the old file
        tmp = args.save.with_name(args.save.name + ".tmp")
        torch.save(cnn.state_dict() if args.tower == "patch-cnn"
                   else {k: v.detach() for k, v in tr.p.items() if k.startswith(TOWER)}, tmp)
        tmp.replace(args.save)


if __name__ == "__main__":
    main()
