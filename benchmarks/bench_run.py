"""``qwenvl-edge run`` end to end, as a user starts it: time to first token and peak RSS.

Each run is a fresh process (imports, GGUF load, ONNX session, encode, prefill); the time to
first token is the process's wall time minus its decode time (from ``--json``), and the peak
RSS comes from ``wait4``. Run with the vision session kept and with it released before decode.
``measure_ttft`` times the first answer byte from process start: a fresh ``run`` (empty store), a
second ``run`` about the same photo (the store's rows and prefix state), a second question in one
process, each against INT8 encode + llama.cpp text prefill of the same positions in the same run.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

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


def measure(bundle: Path, image: Path, question: str, runs: int, threads: int | None) -> dict:
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
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qwenvl-ttft-") as work:
        out.update(measure_ttft(bundle, image, question, threads, Path(work)))
    return out


# --- time to first answer byte: fresh run, second run, second turn, against encode + text prefill ----------

TTFT_TOKENS = 8
BASELINE = """
import json, sys, time
import numpy as np
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.decoder import Decoder
from qwenvl_edge.runtime.preprocess import preprocess_image, read_image
from qwenvl_edge.runtime.prompt import ImageRef, PromptBuilder, Turn, n_positions
from qwenvl_edge.runtime.vision import VisionEncoder
bundle_dir, image, question, threads, repack, mmap = sys.argv[1:7]
threads = int(threads) or None
bundle = Bundle.open(bundle_dir)
out = {}
if repack == "1" and mmap == "0":  # the baseline: one INT8 encode, as a run does it
    encoder = VisionEncoder(bundle.vision_path, n_threads=threads)
    pixels = preprocess_image(read_image(image).image, bundle.model.image_size)
    t = time.perf_counter(); encoder.encode(pixels[None]); out["encode_s"] = time.perf_counter() - t
    encoder.close()
t = time.perf_counter()
decoder = Decoder(bundle.llm_path, n_ctx=2048, n_threads=threads, repack=repack == "1", use_mmap=mmap == "1")
out["load_s"] = time.perf_counter() - t
units = PromptBuilder(bundle.model, decoder.tokenizer).build(Turn(question, (ImageRef("x"),)))
n = n_positions(units)
filler = decoder.tokenizer("The quick brown fox jumps over the lazy dog near the river bank. " * 64)
ids = (filler * (n // len(filler) + 1))[:n]
t = time.perf_counter(); decoder.eval_tokens(ids); out["text_prefill_s"] = time.perf_counter() - t
out["positions"] = n
print(json.dumps(out))
"""
SECOND_TURN = """
import json, sys, time
from qwenvl_edge.runtime.pipeline import QwenVL
bundle_dir, image, question, threads, cache, n = sys.argv[1:7]
with QwenVL(bundle_dir, n_threads=int(threads) or None, cache_dir=cache, keep_vision=False) as m:
    for _ in m.chat(question, [image], max_tokens=int(n), temperature=0, stream=True):
        pass
    t = time.perf_counter()
    for piece in m.chat("And what else can you see?", max_tokens=int(n), temperature=0, stream=True):
        first = time.perf_counter() - t
        break
    print(json.dumps({"second_turn_s": first}))
"""


def first_byte(cmd: list[str], env: dict) -> dict:
    """Wall time from process start to its first stdout byte, the whole wall time and the peak RSS."""
    import os
    import subprocess
    import time

    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    ttft = time.monotonic() - started
    rest = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not first:
        raise RuntimeError(f"{cmd[2:4]} failed: {err.decode(errors='replace')[-500:]}")
    return {"ttft_s": ttft, "wall_s": time.monotonic() - started, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "stdout": (first + rest).decode(errors="replace")}


def measure_ttft(bundle: Path, image: Path, question: str, threads: int | None, work: Path) -> dict:
    """TTFT ratios of a fresh ``run``, a second ``run`` (same store), a second turn, and the baseline."""
    import os

    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "xdg")}
    store = work / "xdg" / "qwenvl-edge"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    run = [sys.executable, "-m", "qwenvl_edge.cli", "run", "--bundle", str(bundle), "--greedy", "--max-tokens",
           str(TTFT_TOKENS), *(["--threads", str(threads)] if threads else []), str(image), question]
    fresh = first_byte(run, env)
    second = first_byte(run, env)
    base_cmd = [sys.executable, "-c", BASELINE, str(bundle), str(image), question, str(threads or 0)]
    baseline = json.loads(first_byte([*base_cmd, "1", "0"], env)["stdout"])
    unpacked = json.loads(first_byte([*base_cmd, "0", "1"], env)["stdout"])
    turn_cmd = [sys.executable, "-c", SECOND_TURN, str(bundle), str(image), question, str(threads or 0),
                str(work / "turn-store"), str(TTFT_TOKENS)]
    turn = first_byte(turn_cmd, env)
    second_turn_s = json.loads(turn["stdout"])["second_turn_s"]
    base_s = baseline["encode_s"] + baseline["text_prefill_s"]
    return {
        "ttft_first_s": fresh["ttft_s"], "ttft_second_run_s": second["ttft_s"], "ttft_second_turn_s": second_turn_s,
        "ttft_baseline_s": base_s, "ttft_baseline": baseline,
        "ttft_first_ratio": fresh["ttft_s"] / base_s,
        "ttft_second_run_ratio": second["ttft_s"] / fresh["ttft_s"],
        "ttft_second_turn_ratio": second_turn_s / fresh["ttft_s"],
        "ttft_first_peak_rss_gb": fresh["peak_rss_gb"], "ttft_second_run_peak_rss_gb": second["peak_rss_gb"],
        "ttft_second_turn_peak_rss_gb": turn["peak_rss_gb"],
        # repacking (llama.cpp's CPU_REPACK buffers, file read) vs a mapped GGUF without repacking
        "repack": {"load_s": baseline["load_s"], "text_prefill_s": baseline["text_prefill_s"],
                   "mapped_unpacked_load_s": unpacked["load_s"],
                   "mapped_unpacked_text_prefill_s": unpacked["text_prefill_s"],
                   "load_cost_s": baseline["load_s"] - unpacked["load_s"],
                   "prefill_saving_s": unpacked["text_prefill_s"] - baseline["text_prefill_s"]},
    }
