"""Time to the first answer byte of ``qwenvl-edge run``, from process start, as a user waits for it.

Measured in one go, each in its own process (peak RSS from ``wait4``):
- a fresh ``run`` (empty store: ``XDG_CACHE_HOME`` in a new temp folder);
- a second plain ``run`` about the same photo (the store's rows and prefix state);
- a second question in the same process (``QwenVL.chat``);
- the baseline: one INT8 encode + llama.cpp's text prefill of the same number of positions,
  in the same run, so ``ttft_first_ratio`` says how much of the load and start is hidden;
- the decoder's load and text prefill for each GGUF load mode (read or mapped, llama.cpp's
  CPU_REPACK buffers or not), to weigh what repacking costs at load against what it saves.

    python -m benchmarks.bench_ttft BUNDLE --json out.json [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TTFT_TOKENS = 8
QUESTION = "What is written on the sign? Describe the picture."
BASELINE = """
import json, sys, time
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.decoder import Decoder
from qwenvl_edge.runtime.preprocess import preprocess_image, read_image
from qwenvl_edge.runtime.prompt import ImageRef, PromptBuilder, Turn, n_positions
from qwenvl_edge.runtime.vision import VisionEncoder
bundle_dir, image, question, threads, repack, mmap, encode = sys.argv[1:8]
threads = int(threads) or None
bundle = Bundle.open(bundle_dir)
out = {}
if encode == "1":  # one INT8 encode, as a run does it
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
sampler = decoder.make_sampler(0.0, 1.0, 0, 0)
t = time.perf_counter()
for _ in range(16):  # decode speed: repacked kernels are faster here, prefill is not
    decoder.eval_tokens([decoder.sample(sampler)])
out["decode_tok_s"] = 16 / (time.perf_counter() - t)
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
# the load modes of the decoder: (name, repack, mmap); the first is what `run` does by default
LOAD_MODES = [("read_repack", "1", "0"), ("mmap_norepack", "0", "1"), ("read_norepack", "0", "0"),
              ("mmap_repack", "1", "1")]
RUN_LOADS = ("map", "read")  # `run --load`: the default first
TIMINGS = re.compile(r"\[load ([\d.]+) s, image encode ([\d.]+) s \((\d+) encoded, (\d+) cached\), restored (\d+) "
                     r"pos, prefill (\d+) pos in ([\d.]+) s, first token ([\d.]+) s")


def first_byte(cmd: list[str], env: dict) -> dict:
    """Wall time from process start to its first stdout byte, the whole wall time and the peak RSS."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        first = proc.stdout.read(1)
        ttft = time.monotonic() - started
        rest = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0 or not first:
        raise RuntimeError(f"{cmd[2:4]} failed: {stderr[-500:]}")
    return {"ttft_s": ttft, "wall_s": time.monotonic() - started, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "stdout": (first + rest).decode(errors="replace"), "stderr": stderr}


def run_timings(stderr: str) -> dict:
    """The phases a ``run`` reports on stderr (its own clock, from the call, not from process start)."""
    m = TIMINGS.search(stderr)
    if not m:
        return {}
    names = ["load_s", "image_encode_s", "images_encoded", "images_from_cache", "restored_positions",
             "prefill_positions", "prefill_s", "call_to_first_token_s"]
    return {k: (float(v) if "." in v else int(v)) for k, v in zip(names, m.groups(), strict=True)}


def progress(name: str, value: dict) -> dict:
    """Each step's numbers on stderr as it ends (a long full-size run that is cut short keeps them)."""
    print(json.dumps({name: {k: v for k, v in value.items() if k not in ("stdout", "stderr")}}), file=sys.stderr,
          flush=True)
    return value


def timed_run(cmd: list[str], env: dict) -> dict:
    out = first_byte(cmd, env)
    return {"ttft_s": out["ttft_s"], "wall_s": out["wall_s"], "peak_rss_gb": out["peak_rss_gb"],
            **run_timings(out["stderr"])}


def median_of(samples: list[dict]) -> dict:
    """Key by key median of numeric samples (the run with the median first byte for anything else)."""
    import statistics

    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(s[k] for s in samples) for k in keys}


def measure_ttft(bundle: Path, image: Path, question: str, threads: int | None, work: Path,
                 load_modes: list[str] | None = None, env_extra: dict | None = None, repeat: int = 1,
                 loads: tuple[str, ...] = RUN_LOADS) -> dict:
    """TTFT ratios of a fresh ``run``, a second ``run`` (same store), a second turn, and the baseline.

    With ``repeat`` > 1 the default ``run`` pair and the load modes are measured that many times,
    interleaved (a shared machine's load drifts), and medians are reported; the baseline's prefill
    is the faster load mode's of the same round, so no load mode's prefill is hidden by the ratio.
    ``loads``: the ``run --load`` values to time (the default first; the others once, to compare).
    """
    work.mkdir(parents=True, exist_ok=True)
    run = [sys.executable, "-m", "qwenvl_edge.cli", "run", "--bundle", str(bundle), "--greedy", "--max-tokens",
           str(TTFT_TOKENS), *(["--threads", str(threads)] if threads else []), str(image), question]
    base_cmd = [sys.executable, "-c", BASELINE, str(bundle), str(image), question, str(threads or 0)]
    env = {**os.environ, **(env_extra or {})}
    runs: dict = {load: {"first": [], "second": []} for load in loads}
    modes: dict = {}
    bases: list[float] = []
    for round_ in range(repeat):
        for load in loads[:1] if round_ else loads:  # `--load read` once, for comparison
            store = {"XDG_CACHE_HOME": str(work / f"xdg-{load}")}
            shutil.rmtree(work / f"xdg-{load}", ignore_errors=True)  # each pair starts from an empty store
            cmd = [*run[:4], "--load", load, *run[4:]]
            for which in ("first", "second"):
                runs[load][which].append(progress(f"{which}_run_{load}", timed_run(cmd, {**env, **store})))
        prefills = []
        for name, repack, mmap in LOAD_MODES:
            if name in ("read_repack", "mmap_norepack") or name in (load_modes or []):
                out = first_byte([*base_cmd, repack, mmap, "1" if name == "read_repack" else "0"], env)
                mode = progress(name, {**json.loads(out["stdout"]), "peak_rss_gb": out["peak_rss_gb"]})
                modes.setdefault(name, []).append(mode)
                prefills.append(mode["text_prefill_s"])
        bases.append(modes["read_repack"][-1]["encode_s"] + min(prefills))
    turn_cmd = [sys.executable, "-c", SECOND_TURN, str(bundle), str(image), question, str(threads or 0),
                str(work / "turn-store"), str(TTFT_TOKENS)]
    turn = first_byte(turn_cmd, env)
    second_turn_s = progress("second_turn", {**turn, **json.loads(turn["stdout"])})["second_turn_s"]
    import statistics

    runs = {load: {which: median_of(samples) for which, samples in pair.items()} for load, pair in runs.items()}
    modes = {name: median_of(samples) for name, samples in modes.items()}
    fresh, second = runs[loads[0]]["first"], runs[loads[0]]["second"]
    base_s = statistics.median(bases)
    return {
        "ttft_first_s": fresh["ttft_s"], "ttft_second_run_s": second["ttft_s"], "ttft_second_turn_s": second_turn_s,
        "ttft_baseline_s": base_s, "ttft_baseline": {**modes["read_repack"], "text_prefill_s": base_s -
                                                     modes["read_repack"]["encode_s"]},
        "ttft_first_ratio": fresh["ttft_s"] / base_s,
        "ttft_second_run_ratio": second["ttft_s"] / fresh["ttft_s"],
        "ttft_second_turn_ratio": second_turn_s / fresh["ttft_s"],
        "ttft_first_peak_rss_gb": fresh["peak_rss_gb"], "ttft_second_run_peak_rss_gb": second["peak_rss_gb"],
        "ttft_second_turn_peak_rss_gb": turn["peak_rss_gb"], "ttft_rounds": repeat,
        "ttft_first_run": fresh, "ttft_second_run": second,
        "ttft_runs_by_load": runs,  # `run --load map` (default) and `--load read` (llama.cpp repacks)
        "ttft_load_modes": modes,  # decoder load, text prefill and decode per GGUF load mode
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--image", type=Path, default=None, help="default: a generated photo")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--load-modes", default="", help="comma list of extra load modes: "
                    + ", ".join(name for name, *_ in LOAD_MODES[2:]))
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the default run pair and load modes (medians)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment of the runs")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qwenvl-ttft-") as tmp:
        work = Path(tmp)
        image = a.image
        if image is None:
            from qwenvl_edge.quant.calibration import generate_images

            image = work / "photo.png"
            generate_images(1, seed=99)[0].save(image)
        env = dict(item.split("=", 1) for item in a.env)
        out = measure_ttft(a.bundle, image, a.question, a.threads, work,
                           [m for m in a.load_modes.split(",") if m], env, a.repeat)
    text = json.dumps(out, indent=2)
    if a.json:
        a.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
