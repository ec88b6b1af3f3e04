"""The phone path at full size: ``qwenvl-native run`` (no Python) with the settings a phone needs.

Each configuration is a fresh ``qwenvl-native run BUNDLE IMAGE QUESTION --greedy --stats`` process: the vision
session (INT8 ONNX, ONNX Runtime's C API) is freed before the decoder loads. Measured: peak RSS (``wait4``; a
mapped GGUF's pages count), time to first token from process start, decode tok/s, and the answer (greedy),
against the first configuration as the baseline of the same run:

- ``default``: the bundle's Q4_K_M GGUF read into memory (llama.cpp repacks it), f16 KV cache (as the desktop);
- ``kv_q8_0``: the same, 8-bit KV cache (half the KV memory; flash attention on);
- ``q4_0_kv_q8_0``: a Q4_0 GGUF (``--q4-0 FILE``; llama.cpp repacks Q4_0 for ARM's dot-product/i8mm kernels)
  with the 8-bit KV cache;
- ``q4_0_kv_q8_0_mmap``: the same mapped and not repacked (``--mmap``): the weights stay clean file pages that
  the OS can drop under memory pressure instead of killing the app.

Figures are x86-64 (this machine), not a phone; the memory figures carry over (same files, same allocations),
the speeds do not. Writes ``native_phone`` into benchmarks/results.json and its section of RESULTS.md::

    python -m benchmarks.bench_native /work/fullsize/bundle IMAGE --q4-0 llm-Q4_0.gguf [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.process_stats import run_measured

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BINARY = REPO / "native-build" / "host" / "qwenvl-native"
QUESTION = "Describe this picture."
MAX_TOKENS = 16
PHONE_BUDGET_GB = 5.5


def derived_bundle(bundle: Path, gguf: Path, llm_type: str, folder: Path) -> Path:
    """A bundle folder like ``bundle`` but with ``gguf`` as its LLM: links to the files, its own manifest (for
    ``qwenvl-native`` only: the GGUF's entry has its size and no sha256, so hashing 5 GB does not eat the run)."""
    folder.mkdir()
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    llm_name = manifest["llm"]["file"]
    for name in manifest["files"]:
        if name != llm_name:
            (folder / name).symlink_to((bundle / name).resolve())
    (folder / llm_name).symlink_to(gguf.resolve())
    manifest["files"][llm_name] = {"bytes": gguf.stat().st_size}  # the native command checks sizes, not sha256
    manifest["llm"].update(type=llm_type, bytes=gguf.stat().st_size)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return folder


def run_config(binary: Path, bundle: Path, image: Path, extra: list[str], threads: int | None) -> dict:
    # the phone path: vision freed before the decoder loads, the GGUF read unless --mmap (the command's defaults
    # are the desktop's: mapped, loaded beside the encoder)
    phone = ["--overlap", "off", *([] if "--mmap" in extra else ["--load", "read"])]
    cmd = [str(binary), "run", str(bundle), str(image), QUESTION, "--greedy", "--max-tokens", str(MAX_TOKENS),
           "--stats", *phone, *extra] + (["--threads", str(threads)] if threads else [])
    stats = run_measured(cmd)
    if stats.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({stats.returncode}): {stats.stderr_lines[-1:]}")
    native = json.loads(stats.stderr_lines[-1][1])
    gguf = (bundle / json.loads((bundle / "manifest.json").read_text())["llm"]["file"]).stat().st_size
    return {"peak_rss_gb": stats.peak_rss_bytes / 1e9, "peak_rss_vision_gb": native["peak_rss_vision_kb"] * 1024 / 1e9,
            "gguf_gb": gguf / 1e9, "ttft_s": native["ttft_ms"] / 1e3, "vision_s": native["vision_ms"] / 1e3,
            "decoder_load_s": native["decoder_load_ms"] / 1e3, "prefill_s": native["prefill_ms"] / 1e3,
            "decode_tok_s": native["decode_tokens_per_s"], "prompt_positions": native["n_prompt_positions"],
            "wall_s": stats.wall_s, "answer": stats.stdout.rstrip("\n")}


def measure(binary: Path, bundle: Path, image: Path, q4_0: Path | None, threads: int | None,
            llm: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="qwenvl-native-bench-") as work:
        if llm is not None:  # the bundle's own LLM type, another file (e.g. with the qwenvl.* keys added)
            manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
            bundle = derived_bundle(bundle, llm, manifest["llm"]["type"], Path(work) / "llm")
        configs = {"default": (bundle, []), "kv_q8_0": (bundle, ["--kv", "q8_0"])}
        if q4_0 is not None:
            small = derived_bundle(bundle, q4_0, "Q4_0", Path(work) / "q4_0")
            configs["q4_0_kv_q8_0"] = (small, ["--kv", "q8_0"])
            configs["q4_0_kv_q8_0_mmap"] = (small, ["--kv", "q8_0", "--mmap"])
        rows = {name: run_config(binary, b, image, extra, threads) for name, (b, extra) in configs.items()}
    base = rows["default"]
    for row in rows.values():
        row["peak_rss_ratio"] = row["peak_rss_gb"] / base["peak_rss_gb"]
        row["ttft_ratio"] = row["ttft_s"] / base["ttft_s"]
        row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["same_answer_as_default"] = row["answer"] == base["answer"]
        row["fits_phone_budget"] = row["peak_rss_gb"] <= PHONE_BUDGET_GB
    return {"arch": os.uname().machine, "max_tokens": MAX_TOKENS, "threads": threads, "question": QUESTION,
            "phone_budget_gb": PHONE_BUDGET_GB, "configs": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("image", type=Path)
    ap.add_argument("--q4-0", type=Path, default=None, help="a Q4_0 GGUF of the same model")
    ap.add_argument("--llm", type=Path, default=None,
                    help="use this GGUF of the bundle's LLM type instead of the bundle's own file")
    ap.add_argument("--binary", type=Path, default=DEFAULT_BINARY)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shared-cpu", action="store_true",
                    help="say in the results that other work shared the CPU (timings: compare ratios only)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results.json")
    a = ap.parse_args(argv)
    if not a.binary.is_file() or shutil.which(str(a.binary)) is None:
        print(f"bench_native: {a.binary} missing: build it with cmake -S . -B native-build/host", file=sys.stderr)
        return 1
    out = measure(a.binary, a.bundle, a.image, a.q4_0, a.threads, a.llm)
    out["cpu_shared"] = a.shared_cpu
    print(json.dumps(out, indent=2))
    results = json.loads(a.results.read_text()) if a.results.is_file() else {}
    results["native_phone"] = out
    if "export" in results:  # the whole report: RESULTS.md gets the phone-path section
        from benchmarks.report import write_report

        write_report(results, a.results.parent)
    else:
        a.results.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
