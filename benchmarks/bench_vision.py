"""Vision encode time per image, FP32 ONNX vs INT8 ONNX (same session options), and INT8 quality.

Run as its own process: ``python -m benchmarks.bench_vision BUNDLE --json OUT``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.measure_cli import measure_main
from qwenvl_edge.contract import MANIFEST_FILE
from qwenvl_edge.quant.calibration import generate_images
from qwenvl_edge.quant.vision_quality import compare_rows
from qwenvl_edge.runtime.preprocess import preprocess_image
from qwenvl_edge.runtime.vision import VisionEncoder

N_IMAGES = 3
IMAGE_SEED = 1234  # not the calibration seed: these images were never used to choose INT8 ranges


def time_encoder(path: Path, pixels: list[np.ndarray], runs: int, threads: int | None) -> tuple[float, list]:
    """Median seconds per image over ``runs`` passes (after one warm-up), and each image's rows."""
    with VisionEncoder(path, n_threads=threads) as encoder:
        encoder.encode(pixels[0][None])  # warm-up: first-run allocations and weight prepacking
        times, rows = [], []
        for run in range(runs):
            for p in pixels:
                started = time.perf_counter()
                out = encoder.encode(p[None])[0]  # (256, hidden)
                times.append(time.perf_counter() - started)
                if run == 0:
                    rows.append(out)
    return statistics.median(times), rows


def measure(bundle: Path, runs: int, threads: int | None) -> dict:
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    size = manifest["model"]["image_size"]
    pixels = [preprocess_image(image, size) for image in generate_images(N_IMAGES, seed=IMAGE_SEED)]
    fp32_s, fp32_rows = time_encoder(bundle / manifest["vision"]["fp32_file"], pixels, runs, threads)
    int8_s, int8_rows = time_encoder(bundle / manifest["vision"]["file"], pixels, runs, threads)
    quality = [compare_rows(a, b) for a, b in zip(fp32_rows, int8_rows, strict=True)]
    return {
        "vision_fp32_s": fp32_s, "vision_int8_s": int8_s, "vision_int8_speedup_vs_fp32": fp32_s / int8_s,
        "vision_int8_mean_cosine": float(np.mean([q["cosine_mean"] for q in quality])),
        "vision_int8_min_cosine": float(min(q["cosine_min"] for q in quality)),
        "vision_images": N_IMAGES, "vision_runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    return measure_main(measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
