"""What the phone settings cost in quality, on the tiny trained Qwen-VL (issue 17): Q4_0 vs Q4_K_M, q8_0 KV cache.

    python -m benchmarks.bench_phone_quality     # 40 images per task, seed 1; needs a host build of qwenvl-native

The full-size model is random, so its answers cannot say what a setting costs; the trained tiny model's can.
Each 4-bit decoder (both bundles with INT8 vision, the phone's) is judged by ``evaluate`` (the body of
``qwenvl-edge eval``) against the float bundle: task accuracy, and the decoder alone on the float rows along
the float answers (top-1 agreement, KL). The KV cache type is set only by the native core (``qwenvl-native
run --kv q8_0``, the phone's path), so its cost is the native command's answers with q8_0 against f16 on the
same images and bundle. Writes ``phone_quality.json`` and ``phone_quality.md`` beside this file; ``report.py``
appends the .md to RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import tempfile
import time
from pathlib import Path

from qwenvl_edge.bundler.bundle_export import ExportOptions, export_bundle
from qwenvl_edge.evaluation.evaluate import MAX_TOKENS, Item, evaluate, synthetic_items
from qwenvl_edge.export.tiny_trained import DATA, write_tiny_trained

HERE = Path(__file__).resolve().parent
NATIVE = HERE.parent / "native-build" / "host" / "qwenvl-native"
DECODERS = ("Q4_K_M", "Q4_0")
KV_TYPES = ("f16", "q8_0")
KV_DECODER = "Q4_0"  # the recommended phone bundle's (480 native runs for both decoders: too long for 2 cores)


def native_answers(native: Path, bundle: Path, items: list[Item], images: Path, kv: str) -> list[str]:
    """The native command's greedy answer to each item (images written once as PNG into ``images``)."""
    answers = []
    for i, item in enumerate(items):
        path = images / f"{i}.png"
        if not path.exists():
            item.image.save(path)
        cmd = [str(native), "run", str(bundle), str(path), item.question, "--greedy", "--kv", kv,
               "--max-tokens", str(MAX_TOKENS), "--threads", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
        answers.append(proc.stdout.strip())
    return answers


def kv_cost(native: Path, bundle: Path, items: list[Item], images: Path) -> dict:
    """Right answers per task with each KV type, and how many q8_0 answers equal the f16 ones."""
    by_kv = {kv: native_answers(native, bundle, items, images, kv) for kv in KV_TYPES}
    right = {kv: {task: sum(bool(it.correct(a)) for it, a in zip(items, answers, strict=True) if it.task == task)
                  for task in dict.fromkeys(it.task for it in items)} for kv, answers in by_kv.items()}
    same = sum(a == b for a, b in zip(*by_kv.values(), strict=True))
    return {"right": right, "same_answers": same, "items": len(items)}


def markdown(result: dict) -> str:
    """The RESULTS.md section."""
    n, seed = result["n_per_task"], result["seed"]
    lines = ["## Phone settings: quality cost on the tiny trained model (issue 17)", "",
             f"Measured on the tiny trained model (not the full-size one, whose random weights have no right answer): "
             f"weights `export/data/tiny_trained.npz` sha256 {result['weights_sha256'][:12]}, "
             f"{n} images per task from seed {seed}, greedy, INT8 vision in every 4-bit bundle, against the FP32 "
             f"vision + F32 decoder bundle; the decoder columns compare each GGUF with F32 on the float rows along "
             f"the float answers (`qwenvl-edge eval`). Reproduce: `python -m benchmarks.bench_phone_quality`.", "",
             "| bundle | colour | sign | grounding | decoder top-1 agreement | KL mean (max) |",
             "| --- | --- | --- | --- | --- | --- |"]
    ref = result["eval"][DECODERS[0]]["tasks"]
    lines.append("| FP32 + F32 (reference) | " + " | ".join(
        f"{v['reference']['right']}/{v['reference']['n']}" for v in ref.values()) + " | - | - |")
    for llm in DECODERS:
        r = result["eval"][llm]
        d = r["decoder"]
        lines.append(f"| INT8 + {llm} | " + " | ".join(f"{v['bundle']['right']}/{v['bundle']['n']}"
                                                      for v in r["tasks"].values())
                     + f" | {100 * d['top1_agreement']:.1f} % | {d['kl_mean']:.4f} ({d['kl_max']:.3f}) nats |")
    for llm, kv in result["kv"].items():
        right = kv["right"]["q8_0"]
        lines.append(f"| INT8 + {llm}, q8_0 KV (`qwenvl-native --kv q8_0`) | "
                     + " | ".join(f"{v}/{n}" for v in right.values())
                     + f" | {kv['same_answers']}/{kv['items']} answers equal to f16 KV's | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40, help="images per task")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 is fastest for a model this small)")
    ap.add_argument("--native", type=Path, default=NATIVE, help="a host build of qwenvl-native")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    if args.n < 1:
        ap.error("--n must be at least 1")
    if not args.native.is_file():
        ap.error(f"{args.native} missing: build it with cmake -S . -B native-build/host")
    items = synthetic_items(args.n, args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qwenvl-phone-quality-") as work:
        ckpt = write_tiny_trained(Path(work) / "ckpt")
        bundles = {llm: export_bundle(ckpt, Path(work) / llm, ExportOptions(vision=vision, llm=llm),
                                      progress=lambda _m: None)
                   for vision, llm in (("fp32", "F32"), *(("int8", d) for d in DECODERS))}
        result = {"n_per_task": args.n, "seed": args.seed,
                  "weights_sha256": hashlib.sha256(DATA.read_bytes()).hexdigest(),
                  "eval": {llm: evaluate(bundles[llm], items, bundles["F32"], args.threads) for llm in DECODERS},
                  "kv": {KV_DECODER: kv_cost(args.native, bundles[KV_DECODER], items, Path(work))}}
    result["seconds"] = round(time.monotonic() - started, 1)
    (args.out / "phone_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "phone_quality.md").write_text(markdown(result))
    print((args.out / "phone_quality.md").read_text())


if __name__ == "__main__":
    main()
