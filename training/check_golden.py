"""Check training/model.py against the original's outputs on the tiny golden checkpoint (tests/golden/tiny)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import decoder_hidden, vision  # noqa: E402

from qwenvl_edge.export.config import QwenConfig  # noqa: E402
from qwenvl_edge.export.synthetic_checkpoint import make_config, make_tensor  # noqa: E402
from qwenvl_edge.export.tensor_record import bf16_bits_to_f32, f32_to_bf16_bits  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "tiny"


def main() -> None:
    cfg = QwenConfig.from_dict(make_config("tiny"))
    p = {n: torch.from_numpy(bf16_bits_to_f32(f32_to_bf16_bits(make_tensor(n, s, 0))).reshape(s))
         for n, s in cfg.tensor_shapes().items()}
    g = np.load(GOLDEN / "golden.npz")
    cases = json.loads((GOLDEN / "golden.json").read_text())["cases"]
    case = next(c for c in cases if c["name"] == "one_image")
    img = case["images"][0]
    with torch.no_grad():
        rows = vision(p, torch.from_numpy(g[f"pixels/{img}"])[None], cfg.visual.heads)[0]
        print("vision max abs err", float((rows - torch.from_numpy(g[f"vision/{img}"])).abs().max()))
        ids = case["input_ids"]
        start = ids.index(-1)
        emb = p["transformer.wte.weight"][torch.tensor([max(i, 0) for i in ids])].clone()
        emb[start:start + 256] = rows
        h = decoder_hidden(p, emb[None], cfg.num_attention_heads)[0, -1]
        logits = p["lm_head.weight"] @ h
        ref = torch.from_numpy(g["logits_last/one_image"])
        err = float((logits - ref).abs().max())
        print("logits max abs err", err, "argmax", int(logits.argmax()), int(ref.argmax()))


if __name__ == "__main__":
    main()
