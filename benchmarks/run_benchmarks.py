"""One command for the full-size benchmark: checkpoint (cached) -> export (cached) -> measurements -> report.

    python -m benchmarks.run_benchmarks                 # full size: 19 GB checkpoint, exported once
    python -m benchmarks.run_benchmarks --preset tiny   # the same path on the tiny model (seconds)

Writing and exporting the full-size checkpoint takes long (about 45 min on 2 cores) and is
cached under --work; the measurements then take minutes. Results go to --out as RESULTS.md,
results.json and time_breakdown.png; every comparison is a ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import bench_export, bench_run, bench_server
from benchmarks.report import machine, write_report
from qwenvl_edge.contract import LLM_FILE, MANIFEST_FILE

HERE = Path(__file__).resolve().parent
QUESTION = "What is written on the sign? Describe the picture."


def cached_json(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    data = make()
    path.write_text(json.dumps(data, indent=2))
    return data


def measure_in_process(module: str, bundle: Path, runs: int, threads: int | None) -> dict:
    """Run ``benchmarks.<module>`` in its own process, so its memory is freed before the next one."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", f"benchmarks.{module}", str(bundle), "--runs", str(runs), "--json", str(out)]
        cmd += ["--threads", str(threads)] if threads else []
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["full", "tiny"], default="full")
    ap.add_argument("--work", type=Path, default=HERE / "cache", help="cache for the checkpoint and bundle")
    ap.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md and results.json go")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--re-export", action="store_true", help="export again even if the bundle is cached")
    ap.add_argument("--cgroup-gb", type=float, default=None,
                    help="run the export in a memory cgroup of this many GiB (default: 8 at full size, none for tiny)")
    ap.add_argument("--analysis", type=Path, default=HERE / "analysis.md",
                    help="hand-written notes appended to RESULTS.md (if the file exists)")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = a.work / f"{a.preset}-checkpoint", a.work / f"{a.preset}-bundle"

    checkpoint = None
    if not (ckpt / "config.json").is_file():
        print(f"writing the {a.preset} random checkpoint to {ckpt}", flush=True)
        checkpoint = cached_json(a.work / f"{a.preset}-checkpoint.json",
                                 lambda: bench_export.synth_checkpoint(ckpt, a.preset))
    elif (a.work / f"{a.preset}-checkpoint.json").is_file():
        checkpoint = json.loads((a.work / f"{a.preset}-checkpoint.json").read_text())
    export_json = a.work / f"{a.preset}-export.json"
    if a.re_export or not (bundle / MANIFEST_FILE).is_file():
        export_json.unlink(missing_ok=True)
    print(f"exporting to {bundle} (cached after the first time)", flush=True)
    cgroup_gb = a.cgroup_gb if a.cgroup_gb is not None else (8.0 if a.preset == "full" else 0.0)
    export = cached_json(export_json, lambda: bench_export.export_bundle(ckpt, bundle, a.threads, cgroup_gb or None))

    results: dict = {"preset": a.preset, "runs": a.runs, "machine": machine(), "checkpoint": checkpoint,
                     **bench_export.export_keys(export), "gguf_gb": export["files_gb"][LLM_FILE]}
    print("measuring vision (FP32 vs INT8)", flush=True)
    results.update(measure_in_process("bench_vision", bundle, a.runs, a.threads))
    print("measuring prefill and decode (image vs text)", flush=True)
    results.update(measure_in_process("bench_llm", bundle, a.runs, a.threads))
    print("measuring `qwenvl-edge run` end to end", flush=True)
    from qwenvl_edge.quant.calibration import generate_images

    image = a.work / "bench-image.png"
    generate_images(1, seed=99)[0].save(image)
    results.update(bench_run.measure(bundle, image, QUESTION, a.runs, a.threads, compare_loads=a.preset == "full"))
    print("measuring `qwenvl-edge serve`: a first question and a follow-up about the same photo", flush=True)
    results.update(bench_server.measure(bundle, a.runs, a.threads))
    if a.analysis.is_file():
        results["notes"] = a.analysis.read_text().splitlines()
    write_report(results, a.out)
    print(f"wrote {a.out / 'RESULTS.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
