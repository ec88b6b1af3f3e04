"""How far a quantized GGUF's next-token distributions are from its float source: the LLM's quality number.

Both files run the same fixed token stream in llama.cpp (one forward pass each, every position's
logits kept); per position we compare the full distributions: KL(reference || candidate) in nats
and whether the most likely token is the same (top-1 agreement). The prompts are joined into one
stream so a mapped multi-GB reference is read once, not once per prompt (at full size the BF16
file is 15 GB and the export runs in 8 GiB). ``qwenvl-edge eval`` reuses these functions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qwenvl_edge import contract
from qwenvl_edge.errors import QwenVLError

SYSTEM = f"<|im_start|>system\n{contract.SYSTEM_PROMPT}<|im_end|>\n"
DEFAULT_PROMPTS: tuple[str, ...] = (
    SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    "The capital of France is Paris.<|im_end|>\n",
    "<|im_start|>user\nPicture 1: a red bicycle leaning on a blue wall. Describe it.<|im_end|>\n"
    "<|im_start|>assistant\nA red bicycle stands against a bright blue wall in the sun.<|im_end|>\n",
    "<|im_start|>user\nFind <ref>the dog</ref> in the picture.<|im_end|>\n<|im_start|>assistant\n"
    "<ref>the dog</ref><box>(120,340),(560,880)</box><|im_end|>\n",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "The quick brown fox jumps over the lazy dog. 1, 2, 3, 5, 8, 13, 21, 34.\n",
    "春天来了，公园里的花都开了。",
)
N_CTX = 512

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64 (KL of near-equal distributions needs the precision)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_next_token(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """KL(reference || candidate) per position and top-1 agreement, from two [positions, vocab] logit arrays."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {candidate.shape}")
    ref, cand = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(ref) * (ref - cand)).sum(axis=-1)
    agree = reference.argmax(-1) == candidate.argmax(-1)
    return {"positions": int(kl.size), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "kl_p99": float(np.quantile(kl, 0.99)), "top1_agreement": float(agree.mean())}


def prompt_tokens(gguf_path: Path, prompts: Sequence[str] = DEFAULT_PROMPTS) -> list[int]:
    """The prompts as one token stream, tokenized by the file's own tokenizer (special tokens parsed)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return [t for p in prompts for t in llm.tokenize(p.encode("utf-8"), add_bos=False, special=True)]
    finally:
        llm.close()


def next_token_logits(gguf_path: Path, tokens: Sequence[int], n_threads: int | None = None) -> np.ndarray:
    """[len(tokens), vocab] float32 logits at every position, one forward pass, the file memory-mapped."""
    import llama_cpp

    from qwenvl_edge.quant.gguf_quant import routed_llama_logs

    n = len(tokens)
    if not 0 < n <= N_CTX:
        raise QwenVLError(f"{n} prompt tokens: need 1..{N_CTX}")
    threads = n_threads or os.cpu_count() or 1
    with routed_llama_logs(lambda _level, line: log.debug("llama.cpp: %s", line)):
        llm = llama_cpp.Llama(str(gguf_path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True,
                              use_mmap=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


def measure_gguf_quality(reference: Path, candidate: Path, prompts: Sequence[str] = DEFAULT_PROMPTS,
                         n_threads: int | None = None, progress: Progress | None = None) -> dict:
    """``compare_next_token`` of ``candidate`` against ``reference`` on ``prompts``; one model loaded at a time."""
    say = progress or (lambda _m: None)
    tokens = prompt_tokens(reference, prompts)
    say(f"llm quality: reference 1/2 ({Path(reference).name}, {len(tokens)} positions)")
    ref = next_token_logits(reference, tokens, n_threads)
    say(f"llm quality: candidate 2/2 ({Path(candidate).name})")
    cand = next_token_logits(candidate, tokens, n_threads)
    return {"reference": Path(reference).name, "prompts": len(prompts), **compare_next_token(ref, cand)}


def measure_gguf_quality_in_worker(reference: Path, candidate: Path, prompts: Sequence[str] = DEFAULT_PROMPTS,
                                   n_threads: int | None = None, progress: Progress | None = None) -> dict:
    """``measure_gguf_quality`` in a worker process (``gguf_quant.run_in_worker``): a signal stops it at once,
    even inside a long llama.cpp call, and the worker is dead before the interrupt unwinds."""
    from qwenvl_edge.quant.gguf_quant import run_in_worker

    job = {"reference": str(reference), "candidate": str(candidate), "prompts": list(prompts), "n_threads": n_threads}
    return run_in_worker("quality", job, progress)


def format_gguf_quality(report: dict, reference: str = "the reference") -> str:
    """One line that says what each number measures (the README's benchmark numbers measure other things)."""
    return (f"greedy top-1 agreement with {reference} on {report['positions']} calibration positions "
            f"{100 * report['top1_agreement']:.1f} %, KL({reference} || quantized) mean {report['kl_mean']:.4f} "
            f"max {report['kl_max']:.4f} nats")
