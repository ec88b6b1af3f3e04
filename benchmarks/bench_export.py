"""Checkpoint and export: wall time, peak RSS of each stage, peak memory inside a memory cgroup, peak disk.

The export runs as one ``qwenvl-edge export`` process with its RSS sampled; the manifest's
stage windows (seconds from the export's own start) are aligned to the samples through the
time-stamped first ``overall:`` line, giving each stage its own peak. With ``cgroup_gb`` the
process runs inside a memory cgroup of that limit (page cache counted, as the kernel counts it):
cgroup v1 (``/sys/fs/cgroup/memory/NAME``: ``memory.limit_in_bytes``, ``memory.max_usage_in_bytes``)
or v2 (``memory.max``, ``memory.peak``); creating one needs root. To reproduce by hand (v1):

    mkdir /sys/fs/cgroup/memory/qwenvl-export
    echo $((8 << 30)) > /sys/fs/cgroup/memory/qwenvl-export/memory.limit_in_bytes
    sh -c 'echo $$ > /sys/fs/cgroup/memory/qwenvl-export/cgroup.procs && exec qwenvl-edge export CKPT OUT'
    cat /sys/fs/cgroup/memory/qwenvl-export/memory.max_usage_in_bytes

    python -m benchmarks.bench_export CKPT OUT --cgroup-gb 8 --results benchmarks/results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from benchmarks.process_stats import ProcessStats, run_measured
from qwenvl_edge.contract import MANIFEST_FILE

GIB = 2**30
V1_ROOT, V2_ROOT = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")


def synth_checkpoint(folder: Path, preset: str) -> dict:
    stats = run_measured([sys.executable, "-m", "qwenvl_edge.cli", "synth", str(folder), "--preset", preset,
                          "--format", "bin", "--shard-mb", "1900"])
    if stats.returncode != 0:
        raise RuntimeError(f"synth failed: {stats.stderr_lines[-3:]}")
    return {"wall_s": stats.wall_s, "peak_rss_gb": stats.peak_rss_bytes / 1e9}


class MemoryCgroup:
    """A memory cgroup with a limit; ``wrap(cmd)`` starts ``cmd`` inside it; ``peak_bytes`` after."""

    def __init__(self, name: str, limit_bytes: int):
        self.limit = limit_bytes
        if (V1_ROOT / "memory.limit_in_bytes").exists():
            self.path, self.limit_file, self.peak_file = V1_ROOT / name, "memory.limit_in_bytes", \
                "memory.max_usage_in_bytes"
        elif "memory" in (V2_ROOT / "cgroup.controllers").read_text():
            self.path, self.limit_file, self.peak_file = V2_ROOT / name, "memory.max", "memory.peak"
        else:
            raise RuntimeError("no memory cgroup controller (v1 or v2) is mounted")
        self.path.mkdir(exist_ok=True)
        (self.path / self.limit_file).write_text(str(limit_bytes))
        if self.peak_file == "memory.max_usage_in_bytes":
            (self.path / self.peak_file).write_text("0")  # reset the peak

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *cmd]

    def peak_bytes(self) -> int:
        return int((self.path / self.peak_file).read_text())

    def oom_kills(self) -> int:
        for name in ("memory.oom_control", "memory.events"):
            f = self.path / name
            if f.exists():
                for line in f.read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        return 0

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def folder_bytes(paths: list[Path]) -> int:
    total = 0
    for root in paths:
        if root.is_file():
            total += root.stat().st_size
        for p in root.rglob("*") if root.is_dir() else ():
            with contextlib.suppress(OSError):
                total += p.stat().st_size if p.is_file() else 0
    return total


class DiskSampler:
    """The largest total size of the export's folders (bundle, its partial, the resume folder) over time."""

    def __init__(self, resume: Path, bundle: Path, every: float = 2.0):
        self.resume, self.bundle, self.every, self.peak = resume, bundle, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            partials = list(self.bundle.parent.glob(f".{self.bundle.name}.*"))  # the bundle being assembled
            self.peak = max(self.peak, folder_bytes([self.resume, self.bundle, *partials]))
            self._stop.wait(self.every)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _offset(stats: ProcessStats, manifest: dict) -> float:
    """Seconds between the process start and the export's own clock start."""
    windows = manifest["export"]["stage_seconds"]
    for t, line in stats.stderr_lines:
        if "overall:" in line:
            return t - windows[next(iter(windows))][0]
    return 0.0


def export_bundle(checkpoint: Path, bundle: Path, threads: int | None, cgroup_gb: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "qwenvl_edge.cli", "export", str(checkpoint), str(bundle), "--vision", "int8",
           "--llm", "Q4_K_M", "--keep-fp32-vision", "--force", "--fresh"]
    cmd += ["--threads", str(threads)] if threads else []
    resume = bundle.parent / ".export-cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(resume)}
    group = MemoryCgroup(f"qwenvl-export-{os.getpid()}", int(cgroup_gb * GIB)) if cgroup_gb else None
    ckpt_bytes = folder_bytes([checkpoint])
    load_average = os.getloadavg()[0]  # a benchmark runs alone: below 0.5 at the start
    try:
        with DiskSampler(resume, bundle) as disk:
            stats = run_measured(group.wrap(cmd) if group else cmd, env=env)
        peak, ooms = (group.peak_bytes(), group.oom_kills()) if group else (None, 0)
    finally:
        if group:
            group.remove()
        shutil.rmtree(resume, ignore_errors=True)
    if stats.returncode != 0:
        raise RuntimeError(f"export failed ({stats.returncode}, {ooms} OOM kills): {stats.stderr_lines[-3:]}")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    offset = _offset(stats, manifest)
    stages = {name: {"wall_s": end - start,
                     "peak_rss_gb": stats.peak_rss_between(start + offset, end + offset) / 1e9}
              for name, (start, end) in manifest["export"]["stage_seconds"].items()}
    return {"wall_s": stats.wall_s, "peak_rss_gb": stats.peak_rss_bytes / 1e9, "stages": stages,
            "load_average_start": load_average,
            "cgroup_limit_gb": cgroup_gb * GIB / 1e9 if cgroup_gb else None,
            "cgroup_peak_gb": peak / 1e9 if peak is not None else None, "cgroup_oom_kills": ooms,
            "disk_peak_gb": (disk.peak + ckpt_bytes) / 1e9, "checkpoint_gb": ckpt_bytes / 1e9,
            "files_gb": {name: entry["bytes"] / 1e9 for name, entry in manifest["files"].items()},
            "vision_quality": manifest["vision"]["quality"]["quality"],
            "llm_quality": manifest["llm"].get("quality")}


def export_keys(export: dict) -> dict:
    """The flat keys results.json carries for the export row."""
    return {"export": export, "export_s": export["wall_s"], "export_peak_rss_gb": export["peak_rss_gb"],
            "export_cgroup_peak_gb": export["cgroup_peak_gb"], "export_cgroup_limit_gb": export["cgroup_limit_gb"],
            "export_disk_peak_gb": export["disk_peak_gb"],
            "export_int8_over_fp32_stage": export["stages"]["vision_int8"]["wall_s"]
            / export["stages"]["vision_fp32"]["wall_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the export row alone: export CKPT into OUT, measured")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--cgroup-gb", type=float, default=8.0, help="memory cgroup limit in GiB (0: none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", type=Path, default=None, help="update this results.json (and its RESULTS.md)")
    a = ap.parse_args(argv)
    started = time.monotonic()
    export = export_bundle(a.checkpoint, a.out, a.threads, a.cgroup_gb or None)
    print(json.dumps(export, indent=2))
    if a.results:
        from benchmarks.report import write_report

        results = json.loads(a.results.read_text())
        results.update(export_keys(export))
        write_report(results, a.results.parent)
    print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
