"""Prefill and decode on the bundle's GGUF: an image prompt vs plain text of the same length.

Both prompts go through the same ``Decoder`` on the same file and context, so the ratios
isolate what the image rows cost. Decode is also compared with the memory-bandwidth bound:
bytes of weights read per token / measured copy bandwidth.
Run as its own process: ``python -m benchmarks.bench_llm BUNDLE --json OUT``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.measure_cli import measure_main
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.decoder import Decoder
from qwenvl_edge.runtime.prompt import ImageRef, PromptBuilder, Turn, n_positions

QUESTION = "Describe this picture in detail, and read any text you can see."
FILLER = ("The quick brown fox jumps over the lazy dog near the river bank, while a small boat drifts "
          "past the old stone bridge and children wave from the shore. ")
DECODE_TOKENS = 32


def text_tokens(runner: Decoder, n: int) -> list[int]:
    """Exactly ``n`` ids of ordinary English text."""
    ids: list[int] = []
    while len(ids) < n:
        ids += runner.tokenizer(FILLER)
    return ids[:n]


def prefill(runner: Decoder, units: list, rows: np.ndarray) -> float:
    runner.keep(0)
    started = time.perf_counter()
    runner.prefill(units, lambda _ref: rows)
    return time.perf_counter() - started


def decode(runner: Decoder, n: int) -> float:
    """Seconds per token for ``n`` greedy tokens (stop tokens ignored: the rate is what counts)."""
    sampler = runner.make_sampler(0.0, 1.0, 0, 0)
    started = time.perf_counter()
    for _ in range(n):
        runner.eval_tokens([runner.sample(sampler)])
    return (time.perf_counter() - started) / n


def copy_bandwidth(nbytes: int = 1 << 30, runs: int = 5) -> float:
    """Bytes per second moved by a large memcpy (read + write), the bound decode cannot beat."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - started)
    return 2 * nbytes / min(times)


def weight_bytes_per_token(gguf_path: Path) -> int:
    """Every tensor is read once per token except the embedding table (one row)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


def measure(bundle_dir: Path, runs: int, threads: int | None) -> dict:
    bundle = Bundle.open(bundle_dir)
    runner = Decoder(bundle.llm_path, n_ctx=2048, n_threads=threads)
    rows = np.random.default_rng(0).standard_normal((bundle.model.n_queries, runner.n_embd)).astype(np.float32)
    builder = PromptBuilder(bundle.model, runner.tokenizer)
    image_units = builder.build(Turn(QUESTION, (ImageRef("bench", bundle.model.n_queries),)))
    n = n_positions(image_units)
    text_units = text_tokens(runner, n)
    result: dict = {"prompt_positions": n, "decode_tokens": DECODE_TOKENS, "llm_runs": runs}
    prompts = {"image": image_units, "text": text_units}
    prefill_s: dict[str, list[float]] = {"image": [], "text": []}
    decode_s: dict[str, list[float]] = {"image": [], "text": []}
    prefill(runner, image_units, rows)  # warm-up: pages the weights in, allocates compute buffers
    for run in range(runs):
        for name in (("image", "text") if run % 2 == 0 else ("text", "image")):  # alternate: no order bias
            prefill_s[name].append(prefill(runner, prompts[name], rows))
            decode_s[name].append(decode(runner, DECODE_TOKENS))
    for name in prompts:
        result[f"prefill_{name}_tok_s"] = n / statistics.median(prefill_s[name])
        result[f"decode_{name}_tok_s"] = 1 / statistics.median(decode_s[name])
    runner.close()
    result["prefill_ratio_vs_text"] = result["prefill_image_tok_s"] / result["prefill_text_tok_s"]
    result["decode_ratio_vs_text"] = result["decode_image_tok_s"] / result["decode_text_tok_s"]
    result["decode_tok_s"] = result["decode_image_tok_s"]
    bandwidth = copy_bandwidth()
    per_token = weight_bytes_per_token(bundle.llm_path)
    result.update({"copy_bandwidth_gb_s": bandwidth / 1e9, "weight_bytes_per_token_gb": per_token / 1e9,
                   "decode_bound_tok_s": bandwidth / per_token})
    result["decode_fraction_of_bound"] = result["decode_tok_s"] / result["decode_bound_tok_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    return measure_main(measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
