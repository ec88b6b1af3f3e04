"""Vision INT8 schemes side by side (issue 29): quality on several towers, speed at full size.

    python -m benchmarks.bench_int8_schemes quality      # tiny trained (200 task images + accuracy), random sizes
    python -m benchmarks.bench_int8_schemes speed        # full size: export stage, session open, encode per scheme

Quality is the worst and mean row cosine of each scheme's INT8 rows against the FP32 rows:
- the tiny trained model (real structure: outlier channels, sharp attention) on 200 task images, with the
  export's accuracy floor (the default, 0.99) and without it (floor 1e-9: the scheme alone), plus task
  accuracy (40 images per task) of an INT8 + F32-decoder bundle against the FP32 + F32 one for the schemes
  that could be the default;
- random checkpoints of three sizes (the golden tiny, an odd one, a wider one) on the export's own images.
Speed runs each scheme's full-size file: the INT8 export stage (1 + 1 measured images, so the stage's
FP32 reference is not the cost being compared), the session open, and the encode of one image, 2 threads.
Run alone: the load average at the start is recorded. Writes ``int8_schemes.json`` and ``int8_schemes.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import machine
from qwenvl_edge.quant.registry import DEFAULT_INT8_FLOOR, DEFAULT_SCHEME, SCHEMES

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "int8_schemes.json"
FULL_FP32 = HERE / "cache" / "full-bundle" / "vision_fp32.onnx"
N_TRAINED = 200
N_ACCURACY_PER_TASK = 40  # answers are the slow part (about 1.5 s each here): 120 per bundle
ACCURACY_SCHEMES = ("dynamic-u8", "dynamic-s7", "dynamic", "static", "nbits8-b128")
TASK_SEED = 1
RANDOM_SIZES: dict[str, dict[str, Any]] = {  # name -> write_checkpoint overrides (preset tiny)
    "tiny golden (width 64, 2 blocks)": {},
    "odd (width 96, 3 blocks, 2 heads)": {"visual": {"width": 96, "layers": 3, "heads": 2}},
    "wide (width 256, 4 blocks, 4 heads)": {"visual": {"width": 256, "layers": 4, "heads": 4}},
}
NO_FLOOR = 1e-9  # a floor every scheme meets: the scheme's own rows


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(update: dict) -> dict:
    result = {**_load(RESULTS), **update}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    (HERE / "int8_schemes.md").write_text(markdown(result))
    return result


def trained_quality(work: Path, schemes: list[str]) -> dict:
    """Per scheme on the tiny trained model: rows on 200 task images with and without the floor, accuracy."""
    from qwenvl_edge.bundler.bundle_export import ExportOptions, export_bundle
    from qwenvl_edge.evaluation.evaluate import evaluate, synthetic_items
    from qwenvl_edge.export.checkpoint import CheckpointReader
    from qwenvl_edge.export.tiny_trained import write_tiny_trained
    from qwenvl_edge.export.vision_onnx import build_vision_onnx
    from qwenvl_edge.quant.calibration import preprocess_all
    from qwenvl_edge.quant.onnx_int8 import quantize_vision
    from qwenvl_edge.quant.vision_quality import compare_rows
    from qwenvl_edge.runtime.vision import VisionEncoder

    ckpt = write_tiny_trained(work / "trained")
    fp32 = build_vision_onnx(CheckpointReader(ckpt), work / "trained_fp32" / "vision_fp32.onnx")
    per_task = -(-N_TRAINED // 3)
    items = synthetic_items(per_task, TASK_SEED)[:N_TRAINED]
    pixels = np.stack(preprocess_all([it.image for it in items]))
    with VisionEncoder(fp32) as encoder:
        reference = encoder.encode(pixels)

    def rows(path: Path) -> dict:
        with VisionEncoder(path) as encoder:
            return compare_rows(reference, encoder.encode(pixels))

    answered = synthetic_items(N_ACCURACY_PER_TASK, TASK_SEED)

    def accuracy(bundle: Path) -> dict:
        tasks = evaluate(bundle, answered, n_threads=1)["tasks"]  # 1 thread is fastest for a model this small
        right = sum(t["bundle"]["right"] for t in tasks.values())
        return {"right": right, "n": len(answered), "per_task": {k: v["bundle"]["right"] for k, v in tasks.items()}}

    float_bundle = export_bundle(ckpt, work / "bundle_fp32", ExportOptions(vision="fp32", llm="F32", n_threads=2),
                                 progress=lambda _m: None)
    out: dict = {"images": len(items), "seed": TASK_SEED, "fp32_accuracy": accuracy(float_bundle), "schemes": {}}
    for name in schemes:
        raw = quantize_vision(fp32, work / name / "raw.onnx", scheme=name, n_threads=2, floor=NO_FLOOR)
        bundle = export_bundle(ckpt, work / name / "bundle", ExportOptions(vision="int8", vision_scheme=name,
                                                                           llm="F32", n_threads=2),
                               progress=lambda _m: None)
        floor = json.loads((bundle / "manifest.json").read_text())["vision"]["quality"]["floor"]
        out["schemes"][name] = {
            "raw": {k: rows(work / name / "raw.onnx")[k] for k in ("cosine_min", "cosine_mean")},
            "raw_calibration_min": raw["floor"]["cosine_min_before"],
            "floor": {"kept_in_float": floor["kept_in_float"], "calibration_min": floor["cosine_min_after"],
                      **{k: rows(bundle / "vision.onnx")[k] for k in ("cosine_min", "cosine_mean")}},
            **({"accuracy": accuracy(bundle)} if name in ACCURACY_SCHEMES else {})}
        print(name, json.dumps(out["schemes"][name]), flush=True)
    return out


def random_quality(work: Path, schemes: list[str]) -> dict:
    """Per tower size and scheme: the export's own report (calibration and held-out rows, what was kept)."""
    from qwenvl_edge.export.checkpoint import CheckpointReader
    from qwenvl_edge.export.synthetic_checkpoint import write_checkpoint
    from qwenvl_edge.export.vision_onnx import build_vision_onnx
    from qwenvl_edge.quant.onnx_int8 import quantize_vision

    out: dict = {}
    for i, (size, overrides) in enumerate(RANDOM_SIZES.items()):
        ckpt = write_checkpoint(work / f"random{i}", "tiny", seed=0 if not overrides else 7, overrides=overrides)
        fp32 = build_vision_onnx(CheckpointReader(ckpt), work / f"random{i}_fp32" / "vision_fp32.onnx")
        out[size] = {}
        for name in schemes:
            report = quantize_vision(fp32, work / f"random{i}_{name}" / "vision.onnx", scheme=name, n_threads=2)
            q = report["quality"]
            out[size][name] = {"cosine_min": min(q[s]["cosine_min"] for s in q),
                               "cosine_mean": float(np.mean([q[s]["cosine_mean"] for s in q])),
                               "kept_in_float": len(report["floor"]["kept_in_float"])}
        print(size, json.dumps(out[size]), flush=True)
    return out


PREPACK = ("on", "parallel", "off")  # onnxruntime's weight prepacking at session open: as is, on 2 threads, none


def encode_speed(path: Path, threads: int = 2, rounds: int = 1, prepack: str = "on") -> dict:
    """Session open (the runtime's options, ``prepack`` varying onnxruntime's weight prepacking) and the
    first and best of ``rounds`` more encodes of one generated 448 x 448 image."""
    import onnxruntime as ort

    from qwenvl_edge.quant.calibration import generate_images, preprocess_all
    from qwenvl_edge.runtime.vision import _session_options

    pixels = np.stack(preprocess_all(generate_images(1, 5), 448))
    options = _session_options(threads, prepack=prepack != "off")
    options.add_session_config_entry("session.prepack.enable_parallel", "1" if prepack == "parallel" else "0")
    started = time.monotonic()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    opened = time.monotonic() - started
    times = []
    for _ in range(rounds + 1):
        t = time.monotonic()
        session.run(None, {session.get_inputs()[0].name: pixels})
        times.append(time.monotonic() - t)
    return {"session_open_s": round(opened, 3), "first_encode_s": round(times[0], 3),
            "encode_s": round(min(times[1:]), 3), "encode_all_s": [round(t, 3) for t in times]}


def encode_in_process(path: Path, avx2: bool, prepack: str = "on") -> dict:
    """``encode_speed`` in a fresh process (cold session, as a ``run``), on this CPU or shown as AVX2-only."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "benchmarks.bench_int8_schemes", "encode", str(path), "--prepack", prepack]
    if avx2:
        cmd = [str(HERE / "avx2_cpuid" / "run.sh"), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _speed_cells(speed: dict, name: str) -> list[str]:
    """encode s and x dynamic-u8 on this CPU and shown as AVX2-only, then the session open."""
    entry, base = speed.get("schemes", {}).get(name, {}), speed.get("schemes", {}).get("dynamic-u8", {})
    cells = []
    for cpu in ("native", "avx2"):
        got = entry.get(cpu)
        cells.append(f"{got['encode_s']:.1f}" if got else "-")
        cells.append(f"x{base[cpu]['encode_s'] / got['encode_s']:.2f}" if got and base.get(cpu) else "-")
    cells.append(f"{entry['native']['session_open_s']:.1f}" if entry.get("native") else "-")
    return cells


def markdown(result: dict) -> str:
    """The RESULTS.md section (and README's table): one row per scheme."""
    trained, random, speed = result.get("trained", {}), result.get("random", {}), result.get("speed", {})
    lines = ["## Vision INT8 schemes (issue 29)", ""]
    if speed:
        m = speed["machine"]
        lines += [f"Speed: full size, one 448 x 448 image, 2 threads, a fresh process; {m.get('cpu', '?')} "
                  f"({' '.join(m.get('vector_extensions', []))}), and the same cores shown as an AVX2-only CPU "
                  f"(`avx2`: benchmarks/avx2_cpuid/run.sh); load average {speed['load_average_start']:.2f} at the "
                  "start. Session open with onnxruntime's prepacking, one thread (FP32: its 7.7 GB read cold). "
                  "Static QDQ was not run at full size (its `quantize_static` export takes about half an hour "
                  "there). " + speed.get("note", ""), ""]
    if trained:
        fp32 = trained["fp32_accuracy"]
        lines += [f"Trained: the tiny trained model, worst / mean row cosine on {trained['images']} task images "
                  f"(seed {trained['seed']}) with the export's floor {DEFAULT_INT8_FLOOR} (MatMuls it kept in "
                  f"float), and task accuracy with an F32 decoder (FP32 vision: {fp32['right']}/{fp32['n']}). "
                  "Random: worst row on the export's own images, per tower. Quality was measured on this CPU, "
                  "where every integer kernel sums exactly; on an AVX2-only CPU `dynamic`'s 16-bit sums saturate "
                  "(test_int8_portable).", ""]
    head = ["scheme", "encode s", "x du8", "AVX2 encode s", "AVX2 x du8", "open s", "full-size min",
            "trained min / mean (kept)", "trained raw min", "accuracy", *(f"{k.split(' (')[0]} min" for k in random)]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in ("fp32", *SCHEMES):
        row = [f"`{name}`" + (" (default)" if name == DEFAULT_SCHEME else "")]
        row += _speed_cells(speed, name) if speed else ["-"] * 5
        full = speed.get("schemes", {}).get(name, {})
        row.append(f"{full['cosine_min']:.4f}" if "cosine_min" in full else "-")
        t = trained.get("schemes", {}).get(name)
        row += ([f"{t['floor']['cosine_min']:.3f} / {t['floor']['cosine_mean']:.4f} "
                 f"({len(t['floor']['kept_in_float'])})", f"{t['raw']['cosine_min']:.3f}",
                 f"{t['accuracy']['right']}/{t['accuracy']['n']}" if "accuracy" in t else "-"] if t else ["-"] * 3)
        row += [f"{random[k][name]['cosine_min']:.4f}" if name in random[k] else "-" for k in random]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=("quality", "speed", "encode"))
    ap.add_argument("path", nargs="?", type=Path, help="encode: the vision.onnx to time")
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--prepack", choices=list(PREPACK), default="on")
    args = ap.parse_args()
    if args.part == "encode":
        print(json.dumps(encode_speed(args.path, prepack=args.prepack)))
        return
    if args.part == "quality":
        with tempfile.TemporaryDirectory(prefix="qwenvl-int8-schemes-") as work:
            _save({"trained": trained_quality(Path(work), args.schemes)})
            _save({"random": random_quality(Path(work), args.schemes)})
    else:
        _save({"speed": full_speed(args.schemes)})
    print((HERE / "int8_schemes.md").read_text())


def full_speed(schemes: list[str]) -> dict:
    """Per scheme at full size: the INT8 stage on 1 + 1 measured images, then the file's open and encode in a
    fresh process, natively and shown as AVX2-only; the default scheme also without and with parallel prepacking."""
    from qwenvl_edge.quant.calibration import generate_images
    from qwenvl_edge.quant.onnx_int8 import quantize_vision

    if not FULL_FP32.exists():
        raise SystemExit(f"{FULL_FP32} missing: run python -m benchmarks.run_benchmarks first (full-size export)")
    out: dict = {"machine": machine(), "load_average_start": os.getloadavg()[0], "schemes": {}}
    out["schemes"]["fp32"] = {"native": encode_in_process(FULL_FP32, False), "avx2": encode_in_process(FULL_FP32, True)}
    print("fp32", json.dumps(out["schemes"]["fp32"]), flush=True)
    for name in schemes:
        if SCHEMES[name].method == "static":
            continue  # quantize_static over the whole tower: about half an hour at full size
        with tempfile.TemporaryDirectory(prefix="int8-", dir=HERE / "cache") as work:
            path = Path(work) / "vision.onnx"
            started = time.monotonic()
            report = quantize_vision(FULL_FP32, path, scheme=name, n_threads=2,
                                     calibration_images=generate_images(1, 0), heldout_images=generate_images(1, 1))
            entry = {"stage_s": round(time.monotonic() - started, 1),
                     "cosine_min": min(q["cosine_min"] for q in report["quality"].values()),
                     "native": encode_in_process(path, False), "avx2": encode_in_process(path, True)}
            if name == DEFAULT_SCHEME:
                entry["prepack"] = {f"{p}_{cpu}": encode_in_process(path, cpu == "avx2", p)
                                    for p in ("off", "parallel") for cpu in ("native", "avx2")}
            out["schemes"][name] = entry
            print(name, json.dumps(entry), flush=True)
    return out


if __name__ == "__main__":
    main()
