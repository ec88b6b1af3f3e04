"""How much of a sign's word the vision rows carry: the training probe's word read-out on held-out signs.

A development tool beside train.py (torch, never imported by the package). It loads a training state
(``training/out/state.pt``, which holds the probe), encodes 48 sign images of another seed and prints on
what fraction of the sign's cells the probe names the right word (16 words: chance is 6.25 %). A tower
whose rows do not carry the word cannot answer the sign task, whatever the decoder learns.

    python training/probe_words.py training/out/state.pt [--vision WIDTH LAYERS]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402

from qwenvl_edge.evaluation import task_images as T  # noqa: E402
from qwenvl_edge.runtime.preprocess import preprocess_image  # noqa: E402

PROBE_SEED, N_IMAGES, BATCH = 7, 48, 8


def word_readout(tr: train.Trainer) -> tuple[int, int]:
    """(cells whose word the probe names, sign cells) over N_IMAGES held-out sign images."""
    hit = total = 0
    samples = T.make_set("sign", N_IMAGES, PROBE_SEED)
    with torch.no_grad():
        for i in range(0, len(samples), BATCH):
            chunk = samples[i:i + BATCH]
            rows = tr.vis(tr.p, torch.from_numpy(np.stack([preprocess_image(s.image) for s in chunk])))
            words = tr.probe_heads(rows)[2][:, 1:]  # the 16 words, background left out
            truth = torch.from_numpy(np.stack([train.cell_targets(s)[2] for s in chunk]).reshape(-1))
            on_sign = truth > 0
            hit += int((words[on_sign].argmax(-1) + 1 == truth[on_sign]).sum())
            total += int(on_sign.sum())
    return hit, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("state", type=Path)
    ap.add_argument("--vision", type=int, nargs=2, metavar=("WIDTH", "LAYERS"), default=None,
                    help="the vision tower size the state was trained with (train.py --vision)")
    args = ap.parse_args()
    if not args.state.is_file():
        ap.error(f"{args.state}: no such state file (train.py writes training/out/state.pt)")
    if args.vision:
        train.OVERRIDES["visual"].update(width=args.vision[0], layers=args.vision[1])
    tr = train.Trainer(argparse.Namespace(heldout=1))
    st = torch.load(args.state)
    if "probe" not in st:
        ap.error(f"{args.state}: no probe in this state")
    tr.load(st)
    hit, total = word_readout(tr)
    print(f"step {st['step']}: the probe names the word of {hit}/{total} sign cells ({hit / total:.1%}; "
          f"chance {1 / len(T.WORDS):.1%})")


if __name__ == "__main__":
    main()
