"""RESULTS.md, results.json and a time-breakdown plot from one benchmark run."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from PIL import Image, ImageDraw

# key, target, higher is better, what
TARGETS = [
    ("decode_ratio_vs_text", 0.97, True, "decode tok/s after an image / plain-text decode (same GGUF)"),
    ("prefill_ratio_vs_text", 0.95, True, "image-row prefill rate / text prefill rate"),
    ("vision_int8_speedup_vs_fp32", 2.0, True, "INT8 vision speed-up over FP32 ONNX"),
    ("vision_int8_mean_cosine", 0.99, True, "INT8 rows vs FP32 rows, mean cosine"),
    ("export_cgroup_peak_gb", 8.59, False, "export peak memory inside an 8 GiB cgroup, page cache counted (GB)"),
    ("export_peak_rss_gb", 6.44, False, "export peak RSS (GB; the aim: 6 GiB)"),
    ("export_s", 824, False, "export wall time (s; 1.1 x the 749 s of the whole-graph export)"),
    ("run_peak_rss_over_gguf_gb", 2.5, False, "`run` peak RSS minus GGUF size (GB)"),
    ("ttft_first_ratio", 1.05, False, "fresh `run` first answer byte / (INT8 encode + text prefill, same positions)"),
    ("ttft_second_run_ratio", 0.25, False, "second `run` about the same photo / fresh `run` (first answer byte)"),
    ("ttft_second_turn_ratio", 0.05, False, "second question in the same process / fresh `run` (first answer byte)"),
    # bench_native_vs_python, bench_serve_parallel (run alone, after run_benchmarks; merged into results.json)
    ("native_vs_python_decode_ratio", 0.95, True, "`qwenvl-native run` decode tok/s / `qwenvl-edge run`'s"),
    ("native_vs_python_ttft_ratio", 1.05, False, "`qwenvl-native run` first answer byte / `qwenvl-edge run`'s"),
    ("serve_parallel4_throughput_ratio", 2.5, True, "`serve --parallel 4`: four clients' decode tok/s / one client's"),
    ("ttft_second_run_resident_ratio", 0.05, False, "second `run` through a resident server / fresh `run`"),
    # issue 29: bench_export (the stage ratio) and bench_int8_schemes (run alone; merged into results.json)
    ("export_int8_over_fp32_stage", 2.0, False, "export: INT8 vision stage / FP32 vision stage (8 GiB cgroup)"),
    ("vision_int8_speedup_vs_dynamic_u8", 1.8, True, "default INT8 encode speed-up over `dynamic-u8`, same CPU"),
    ("vision_session_open_s", 1.0, False, "default INT8 vision session open at full size (s)"),
    ("vision_int8_min_cosine_trained", 0.99, True, "worst INT8 row cosine, tiny trained model, 200 task images"),
]


VECTOR_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_int8", "asimd", "asimddp", "i8mm")


def machine() -> dict:
    import llama_cpp
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    import os

    flags = next((set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), set())
    vector = ("AVX-512 VNNI" if {"avx512f", "avx512_vnni"} <= flags else "AVX-512" if "avx512f" in flags
              else "AVX2" if "avx2" in flags else "no AVX2")
    built = llama_cpp.llama_print_system_info().decode(errors="replace")  # what llama.cpp was compiled for
    extensions = [f for f in VECTOR_FLAGS if f in flags]  # what picks onnxruntime's and llama.cpp's kernels
    return {"cpu": cpu, "cpu_vector": vector, "vector_extensions": extensions, "cores": len(os.sched_getaffinity(0)),
            "memory_gb": round(mem / 1e6, 1),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_features": " ".join(part.split("=")[0].strip() for part in built.split("|")[1:]
                                           if part.strip().endswith("= 1"))}


def target_rows(results: dict) -> list[str]:
    rows = ["| measure | target | measured | met |", "| --- | --- | --- | --- |"]
    for key, target, higher, what in TARGETS:
        value = results.get(key)
        if value is None:
            rows.append(f"| {what} (`{key}`) | {'>=' if higher else '<='} {target} | not measured | - |")
            continue
        met = value >= target if higher else value <= target
        gap = "" if met else f" (missed by {abs(value - target):.3g})"
        rows.append(f"| {what} (`{key}`) | {'>=' if higher else '<='} {target} | {value:.3f} | "
                    f"{'yes' if met else 'no' + gap} |")
    return rows


def plot_breakdown(results: dict, out: Path) -> Path:
    """Horizontal stacked bar: where the seconds to the first token go, then 16 decoded tokens."""
    run = results["run_released"]
    rest = max(run["ttft_s"] - run["load_s"] - run["image_encode_s"] - run["prefill_s"], 0.0)
    parts = [("start", run["load_s"], "#9e9e9e"), ("image encode (INT8)", run["image_encode_s"], "#4363d8"),
             ("decoder load", rest, "#911eb4"), ("prefill", run["prefill_s"], "#f58231"),
             ("16 tokens decode", 16 / max(run["decode_tok_s"], 1e-9), "#3cb44b")]
    total = sum(p[1] for p in parts)
    width, height, left = 900, 220, 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), f"qwenvl-edge run, {results['preset']} model: {total:.1f} s for the first 16 tokens",
              fill="black")
    x = left
    scale = (width - 2 * left) / total
    for i, (name, seconds, color) in enumerate(parts):
        w = seconds * scale
        draw.rectangle([x, 50, x + w, 110], fill=color)
        draw.rectangle([left + 175 * i, 140, left + 175 * i + 14, 154], fill=color)
        draw.text((left + 175 * i + 20, 141), f"{name}: {seconds:.1f} s", fill="black")
        x += w
    image.save(out)
    return out


def server_rows(results: dict) -> list[str]:
    """``qwenvl-edge serve``: time to first token, a new photo vs a follow-up about it (conversation resent)."""
    if "server_first_ttft_s" not in results:
        return []
    cached = results.get("server_followup_cached_tokens")
    reuse = (f"{cached} of {results['server_followup_prompt_tokens']} prompt tokens reused"
             if cached is not None else "reuse not reported")
    return ["", "## `qwenvl-edge serve` (one server process, streamed, measured at the client)", "",
            "| question | time to first token |", "| --- | --- |",
            f"| first question about a new photo | {results['server_first_ttft_s']:.2f} s |",
            f"| follow-up about the same photo, conversation resent ({reuse}) | "
            f"{results['server_followup_ttft_s']:.2f} s (x{results['server_followup_ttft_ratio']:.3f}) |",
            f"| server start to healthy (model loaded) | {results['server_ready_s']:.1f} s |",
            f"| server RSS after the questions | {results['server_rss_gb']:.2f} GB |"]


def ttft_rows(results: dict) -> list[str]:
    """First answer byte from process start: fresh run, second run, second turn, baseline; peak RSS of each."""
    if "ttft_first_s" not in results:
        return []
    b = results["ttft_baseline"]
    lines = [
        "", "## Time to the first answer byte (wall time from process start)", "",
        *([results["ttft_conditions"] + ".", ""] if results.get("ttft_conditions") else []),
        "| case | first byte | ratio | peak RSS |", "| --- | --- | --- | --- |",
        f"| fresh `run` (empty store) | {results['ttft_first_s']:.2f} s | {results['ttft_first_ratio']:.3f} x baseline "
        f"| {results['ttft_first_peak_rss_gb']:.2f} GB |",
        f"| second `run`, same photo | {results['ttft_second_run_s']:.2f} s | {results['ttft_second_run_ratio']:.3f} x "
        f"fresh | {results['ttft_second_run_peak_rss_gb']:.2f} GB |",
        f"| second question, same process | {results['ttft_second_turn_s']:.3f} s | "
        f"{results['ttft_second_turn_ratio']:.3f} x fresh | {results['ttft_second_turn_peak_rss_gb']:.2f} GB |",
        f"| baseline: INT8 encode + text prefill of {b['positions']} positions | {results['ttft_baseline_s']:.2f} s "
        f"({b['encode_s']:.2f} + {b['text_prefill_s']:.2f}) | 1 | {b['peak_rss_gb']:.2f} GB |",
    ]
    runs = results.get("ttft_runs_by_load", {})
    if runs:
        lines += ["", "| `run --load` | run | first byte | load wait / encode / prefill | restored | peak RSS |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for load, pair in runs.items():
            for which, r in pair.items():
                lines.append(f"| {load} | {which} | {r['ttft_s']:.2f} s | {r.get('load_s', 0):.2f} / "
                             f"{r.get('image_encode_s', 0):.2f} / {r.get('prefill_s', 0):.2f} s | "
                             f"{r.get('restored_positions', 0)} pos | {r['peak_rss_gb']:.2f} GB |")
    modes = results.get("ttft_load_modes", {})
    if modes:
        lines += ["", "| decoder load mode | load | text prefill | decode | peak RSS |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {m['load_s']:.2f} s | {m['text_prefill_s']:.2f} s | "
                  f"{m.get('decode_tok_s', 0):.2f} tok/s | {m['peak_rss_gb']:.2f} GB |" for name, m in modes.items()]
    return lines


def native_rows(results: dict) -> list[str]:
    """The phone path: ``qwenvl-native run`` (benchmarks/bench_native.py), x86-64 figures."""
    native = results.get("native_phone")
    if not native:
        return []
    lines = ["", f"## Phone path: `qwenvl-native run` at full size ({native['arch']} figures, not a phone)", "",
             f"One image, {native['max_tokens']} greedy tokens, a fresh process each; the vision session (INT8 ONNX, "
             "ONNX Runtime's C API) is freed before the decoder loads; the GGUF is read and repacked by llama.cpp, or "
             "mapped as it is (`_mmap`: its pages count in the RSS but the OS can drop them). Ratios against "
             f"`default` of the same run; phone budget {native['phone_budget_gb']} GB."
             + (" Another job shared the 2 cores during this run: compare the timings as ratios only."
                if native.get("cpu_shared") else ""),
             "",
             "| configuration | GGUF | peak RSS | peak during vision | time to first token | decode | same answer |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in native["configs"].items():
        lines.append(f"| {name} | {r['gguf_gb']:.2f} GB | {r['peak_rss_gb']:.2f} GB (x{r['peak_rss_ratio']:.2f})"
                     f"{'' if r['fits_phone_budget'] else ' over budget'} | {r['peak_rss_vision_gb']:.2f} GB | "
                     f"{r['ttft_s']:.1f} s (x{r['ttft_ratio']:.2f}) | {r['decode_tok_s']:.2f} tok/s "
                     f"(x{r['decode_ratio']:.2f}) | {'yes' if r['same_answer_as_default'] else 'no'} |")
    return lines


def write_report(results: dict, folder: Path) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot = plot_breakdown(results, folder / "time_breakdown.png")
    m, e = results["machine"], results["export"]
    lines = [
        "# qwenvl-edge benchmark results", "",
        f"Preset `{results['preset']}` (random weights, real shapes), {results['runs']} runs per timing (medians).",
        f"Machine: {m['cpu']}" + (f" ({m['cpu_vector']}; llama.cpp built for {m['llama_cpp_features']})"
                                  if m.get("cpu_vector") else "")
        + f", {m['cores']} cores, {m['memory_gb']} GB RAM; onnxruntime {m['onnxruntime']}, "
        f"llama-cpp-python {m['llama_cpp_python']}, Python {m['python']}. Threads: all cores.",
        "Reproduce: `python -m benchmarks.run_benchmarks` (see benchmarks/README.md).", "",
        "## Targets", "", *target_rows(results), "",
        "## Speed", "",
        "| what | value |", "| --- | --- |",
        f"| vision encode per image, FP32 ONNX | {results['vision_fp32_s']:.2f} s |",
        f"| vision encode per image, INT8 ONNX | {results['vision_int8_s']:.2f} s |",
        f"| INT8 rows vs FP32, mean / min cosine | {results['vision_int8_mean_cosine']:.4f} / "
        f"{results['vision_int8_min_cosine']:.4f} |",
        f"| prefill, image prompt ({results['prompt_positions']} positions) | "
        f"{results['prefill_image_tok_s']:.1f} pos/s |",
        f"| prefill, text prompt (same length) | {results['prefill_text_tok_s']:.1f} tok/s |",
        f"| decode after the image prompt | {results['decode_image_tok_s']:.2f} tok/s |",
        f"| decode after the text prompt | {results['decode_text_tok_s']:.2f} tok/s |",
        f"| memory-bandwidth bound ({results['weight_bytes_per_token_gb']:.2f} GB/token at "
        f"{results['copy_bandwidth_gb_s']:.1f} GB/s copy) | {results['decode_bound_tok_s']:.2f} tok/s "
        f"(decode reaches {100 * results['decode_fraction_of_bound']:.0f}%) |", "",
        "## `qwenvl-edge run` end to end (fresh process, one image, 16 greedy tokens)", "",
        "| vision session (`run` default: released) | time to first token | of which start / encode / prefill "
        "| decode | peak RSS | RSS - GGUF |", "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode in ("kept", "released"):
        r = results[f"run_{mode}"]
        lines.append(f"| {mode} | {r['ttft_s']:.2f} s | {r['load_s']:.2f} / {r['image_encode_s']:.2f} / "
                     f"{r['prefill_s']:.2f} s | {r['decode_tok_s']:.2f} tok/s | {r['peak_rss_gb']:.2f} GB | "
                     f"{r['peak_rss_over_gguf_gb']:.2f} GB |")
    lines += ttft_rows(results)
    lines += server_rows(results)
    lines += native_rows(results)
    lines += ["", f"![time breakdown]({plot.name})", "", "## Export", "",
              f"Whole export: {e['wall_s']:.0f} s, peak RSS {e['peak_rss_gb']:.2f} GB"
              + (f"; inside a memory cgroup of {e['cgroup_limit_gb']:.2f} GB (8 GiB) its peak, page cache counted, "
                 f"was {e['cgroup_peak_gb']:.2f} GB ({e.get('cgroup_oom_kills', 0)} OOM kills)"
                 if e.get("cgroup_limit_gb") else "")
              + (f"; disk peak {e['disk_peak_gb']:.1f} GB with the {e['checkpoint_gb']:.1f} GB checkpoint"
                 if e.get("disk_peak_gb") else "") + ".", "",
              "| stage | wall | peak RSS |", "| --- | --- | --- |"]
    if results.get("checkpoint"):
        c = results["checkpoint"]
        lines.append(f"| write the random checkpoint (`synth`) | {c['wall_s']:.0f} s | {c['peak_rss_gb']:.2f} GB |")
    for name, s in e["stages"].items():
        lines.append(f"| {name} | {s['wall_s']:.0f} s | {s['peak_rss_gb']:.2f} GB |")
    lines += ["", "| bundle file | size |", "| --- | --- |"]
    lines += [f"| {name} | {gb:.2f} GB |" for name, gb in e["files_gb"].items()]
    # written by bench_accuracy and bench_phone_quality (the tiny trained model)
    for section in (folder / "accuracy.md", folder / "phone_quality.md", folder / "batch.md",
                    folder / "native_vs_python.md", folder / "serve_parallel.md", folder / "int8_schemes.md"):
        if section.is_file():
            lines += ["", section.read_text().rstrip("\n")]
    notes = results.get("notes")
    if notes:
        lines += ["", "## Notes", "", *notes]
    (folder / "RESULTS.md").write_text("\n".join(lines) + "\n")
