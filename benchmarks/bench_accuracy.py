"""Task accuracy of the tiny trained Qwen-VL: float bundle vs the default INT8 + Q4_K_M bundle, by ``eval``.

    python -m benchmarks.bench_accuracy            # 200 images per task, seed 2 (never seen in training)

Rebuilds the checkpoint from the shipped weights, exports both bundles, runs ``evaluate`` (the
body of ``qwenvl-edge eval``) and writes ``accuracy.json`` and ``accuracy.md`` beside this file;
``report.py`` appends ``accuracy.md`` to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from qwenvl_edge.bundler.bundle_export import ExportOptions, export_bundle
from qwenvl_edge.evaluation.evaluate import evaluate, synthetic_items
from qwenvl_edge.export.tiny_trained import write_tiny_trained

HERE = Path(__file__).resolve().parent
FLOORS = {"colour": 0.97, "sign": 0.90, "grounding": 0.80}


def markdown(report: dict, n: int, seed: int, seconds: float) -> str:
    """The RESULTS.md section: one row per task, the issue's floors beside the numbers."""
    lines = ["## Tiny trained model: task accuracy (issue 15)", "",
             f"{n} images per task from seed {seed} (training drew from seed 20261201), answered greedily, "
             f"measured by `qwenvl-edge eval` ({seconds:.0f} s). Reproduce: `python -m benchmarks.bench_accuracy`.", "",
             "| task | FP32 vision + F32 LLM | INT8 vision + Q4_K_M (default) | difference | float floor | met |",
             "| --- | --- | --- | --- | --- | --- |"]
    for task, floor in FLOORS.items():
        ref, cand = report["tasks"][task]["reference"], report["tasks"][task]["bundle"]
        diff = 100 * (cand["accuracy"] - ref["accuracy"])
        met = ref["accuracy"] >= floor and diff >= -3
        lines.append(f"| {task} | {100 * ref['accuracy']:.1f} % ({ref['right']}/{ref['n']}) | "
                     f"{100 * cand['accuracy']:.1f} % ({cand['right']}/{cand['n']}) | {diff:+.1f} points | "
                     f">= {100 * floor:.0f} %, within 3 points | {'yes' if met else 'no'} |")
    v, d = report["vision"], report["decoder"]
    lines += ["", f"Stage by stage, on the first {v['images'] // 3} images per task: INT8 vision rows vs FP32, "
              f"cosine mean {v['cosine_mean']:.4f} (min "
              f"{v['cosine_min']:.4f}), relative error mean {v['rel_error_mean']:.4f}; Q4_K_M decoder vs F32 on the "
              f"same rows along the float answers ({d['positions']} positions): top-1 agreement "
              f"{100 * d['top1_agreement']:.1f} %, KL mean {d['kl_mean']:.4f} nats (max {d['kl_max']:.4f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--compare", type=int, default=50, help="images per task for the vision and decoder comparison")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 is fastest for a model this small)")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwenvl-accuracy-") as work:
        ckpt = write_tiny_trained(Path(work) / "ckpt")
        bundles = {}
        for name, vision, llm in (("float", "fp32", "F32"), ("default", "int8", "Q4_K_M")):
            bundles[name] = export_bundle(ckpt, Path(work) / name, ExportOptions(vision=vision, llm=llm),
                                          progress=lambda _m: None)
        started = time.monotonic()
        report = evaluate(bundles["default"], synthetic_items(args.n, args.seed), bundles["float"], args.threads,
                          compare_per_task=args.compare)
        seconds = time.monotonic() - started
    report.update(n_per_task=args.n, seed=args.seed, seconds=round(seconds, 1))
    (args.out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "accuracy.md").write_text(markdown(report, args.n, args.seed, seconds))
    print((args.out / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
