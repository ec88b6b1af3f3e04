"""The full-size benchmark's script, run end to end on the tiny model (CI never runs the full size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.native_build import BUILD_ROOT, build_native, needs_cmake

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["decode_ratio_vs_text", "prefill_ratio_vs_text", "vision_int8_speedup_vs_fp32", "vision_int8_mean_cosine",
            "export_peak_rss_gb", "run_peak_rss_over_gguf_gb", "ttft_s", "decode_tok_s", "vision_int8_s", "gguf_gb",
            "server_first_ttft_s", "server_followup_ttft_s", "server_followup_ttft_ratio",
            "export_s", "export_disk_peak_gb"]


@pytest.mark.long
def test_benchmark_runs_on_the_tiny_model(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "benchmarks.run_benchmarks", "--preset", "tiny", "--runs", "1",
                    "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")], cwd=REPO, check=True,
                   timeout=600)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    missing = [k for k in REQUIRED if not isinstance(results.get(k), float)]
    assert missing == []
    assert results["gguf_gb"] > 0 and results["export"]["stages"]["llm_quant"]["peak_rss_gb"] > 0
    assert 0 < results["vision_int8_mean_cosine"] <= 1.0
    report = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "## Targets" in report and "decode_ratio_vs_text" in report
    assert Image.open(tmp_path / "out" / "time_breakdown.png").size == (900, 220)


@needs_cmake
def test_native_vs_python_benchmark_runs_on_the_tiny_bundle(tmp_path: Path, default_bundle: Path, golden) -> None:
    """benchmarks/bench_native_vs_python.py end to end, one round idle and beside a busy process, on the tiny
    INT8 + Q4_K_M bundle: catches a command line either runtime refuses, a stats line or timings line the script
    no longer parses, and results.json keys or the RESULTS.md section that go missing (timings are not checked)."""
    binary = build_native(BUILD_ROOT / "host") / "qwenvl-native"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"kept": 1}))  # merged into, not replaced
    subprocess.run([sys.executable, "-m", "benchmarks.bench_native_vs_python", str(default_bundle),
                    str(golden.images["sign"]), "--binary", str(binary), "--threads", "2", "--tokens", "4",
                    "--rounds", "1", "--busy", "--results", str(results)], cwd=REPO, check=True, timeout=600,
                   capture_output=True)
    out = json.loads(results.read_text())
    assert out["kept"] == 1
    ratios = ["native_vs_python_decode_ratio", "native_vs_python_ttft_ratio", "native_vs_python_decode_ratio_busy",
              "native_vs_python_ttft_ratio_busy"]
    assert all(isinstance(out[k], float) and out[k] > 0 for k in ratios), {k: out.get(k) for k in ratios}
    bench = out["native_vs_python"]
    assert bench["idle"]["same_answer"] and bench["busy"]["same_answer"]  # greedy, same GGUF and rows
    assert bench["idle"]["native"]["overlap"] is not None and bench["idle"]["native"]["load"] == "map"
    assert bench["idle"]["python"]["peak_rss_gb"] > 0 and len(bench["machine"]["loadavg_start"]) == 3
    assert "avx2" in bench["machine"]["cpu_vector_flags"] or bench["machine"]["arch"] != "x86_64"
    section = (tmp_path / "native_vs_python.md").read_text()
    assert "| busy | native |" in section and "target >= 0.95" in section
