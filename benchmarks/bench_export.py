"""Checkpoint and export: wall time and peak RSS of each stage, bundle file sizes.

The export runs as one ``qwenvl-edge export`` process with its RSS sampled; the manifest's
stage windows (seconds from the export's own start) are aligned to the samples through the
time-stamped ``bundle: checksums`` line, giving each stage its own peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.process_stats import ProcessStats, run_measured
from qwenvl_edge.contract import MANIFEST_FILE


def synth_checkpoint(folder: Path, preset: str) -> dict:
    stats = run_measured([sys.executable, "-m", "qwenvl_edge.cli", "synth", str(folder), "--preset", preset,
                          "--format", "bin", "--shard-mb", "1900"])
    if stats.returncode != 0:
        raise RuntimeError(f"synth failed: {stats.stderr_lines[-3:]}")
    return {"wall_s": stats.wall_s, "peak_rss_gb": stats.peak_rss_bytes / 1e9}


def _offset(stats: ProcessStats, manifest: dict) -> float:
    """Seconds between the process start and the export's own clock start."""
    for t, line in stats.stderr_lines:
        if "bundle: checksums" in line:
            return t - manifest["export"]["stage_seconds"]["checksums"][0]
    return 0.0


def export_bundle(checkpoint: Path, bundle: Path, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "qwenvl_edge.cli", "export", str(checkpoint), str(bundle), "--vision", "int8",
           "--llm", "Q4_K_M", "--keep-fp32-vision", "--force"]
    cmd += ["--threads", str(threads)] if threads else []
    stats = run_measured(cmd)
    if stats.returncode != 0:
        raise RuntimeError(f"export failed: {stats.stderr_lines[-3:]}")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    offset = _offset(stats, manifest)
    stages = {name: {"wall_s": end - start,
                     "peak_rss_gb": stats.peak_rss_between(start + offset, end + offset) / 1e9}
              for name, (start, end) in manifest["export"]["stage_seconds"].items()}
    return {"wall_s": stats.wall_s, "peak_rss_gb": stats.peak_rss_bytes / 1e9, "stages": stages,
            "files_gb": {name: entry["bytes"] / 1e9 for name, entry in manifest["files"].items()},
            "vision_quality": manifest["vision"]["quality"]["quality"]}
