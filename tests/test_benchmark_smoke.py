"""The full-size benchmark's script, run end to end on the tiny model (CI never runs the full size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

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
