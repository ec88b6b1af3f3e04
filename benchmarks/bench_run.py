"""``qwenvl-edge run`` end to end, as a user starts it: time to first token and peak RSS.

Each run is a fresh process (imports, GGUF load, ONNX session, encode, prefill); the time to
first token is the process's wall time minus its decode time (from ``--json``), and the peak
RSS comes from ``wait4``. Run with the vision session kept and with it released before decode.
``bench_ttft.measure_ttft`` times the first answer byte from process start (see there).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_ttft import RUN_LOADS, measure_ttft
from benchmarks.process_stats import run_measured
from qwenvl_edge.contract import LLM_FILE

MAX_TOKENS = 16


def run_once(bundle: Path, image: Path, question: str, release_vision: bool, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "qwenvl_edge.cli", "run", "--bundle", str(bundle), "--json", "--greedy",
           "--no-cache", "--max-tokens", str(MAX_TOKENS), str(image), question]
    cmd += [] if release_vision else ["--keep-vision"]
    cmd += ["--threads", str(threads)] if threads else []
    stats = run_measured(cmd)
    if stats.returncode != 0:
        raise RuntimeError(f"run failed ({stats.returncode}): {stats.stderr_lines[-1:]}")
    timings = json.loads(stats.stdout)["timings"]
    return {"wall_s": stats.wall_s, "ttft_e2e_s": stats.wall_s - timings["decode_s"],
            "peak_rss_bytes": stats.peak_rss_bytes, **timings}


def measure(bundle: Path, image: Path, question: str, runs: int, threads: int | None,
            compare_loads: bool = True) -> dict:
    gguf_bytes = (bundle / LLM_FILE).stat().st_size
    out: dict = {"run_runs": runs}
    for mode, release in (("kept", False), ("released", True)):
        results = [run_once(bundle, image, question, release, threads) for _ in range(runs)]
        peak = max(r["peak_rss_bytes"] for r in results)
        out[f"run_{mode}"] = {
            "ttft_s": statistics.median(r["ttft_e2e_s"] for r in results),
            "load_s": statistics.median(r["wall_s"] - r["decode_s"] - r["ttft_s"] for r in results),
            "image_encode_s": statistics.median(r["image_encode_s"] for r in results),
            "prefill_s": statistics.median(r["prefill_s"] for r in results),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in results),
            "peak_rss_gb": peak / 1e9, "peak_rss_over_gguf_gb": (peak - gguf_bytes) / 1e9,
        }
    out["ttft_s"] = out["run_released"]["ttft_s"]  # `run` frees the vision session by default
    out["run_peak_rss_over_gguf_gb"] = out["run_released"]["peak_rss_over_gguf_gb"]
    with tempfile.TemporaryDirectory(prefix="qwenvl-ttft-") as work:
        loads = RUN_LOADS if compare_loads else RUN_LOADS[:1]  # `run --load read` too, or the default only
        out.update(measure_ttft(bundle, image, question, threads, Path(work), loads=loads))
    return out
