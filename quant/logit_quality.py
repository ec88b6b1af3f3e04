"""How far a quantized decoder's next-token distributions are from its float source.

The number every GGUF quantization should report beside the vision rows' cosine: at each
compared position, whether the two argmax tokens agree and the KL divergence
KL(reference || candidate) of the softmax distributions, in nats. numpy only.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and KL(reference || candidate) over positions ([positions, vocab] each)."""
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(f"logit shapes differ or are not [positions, vocab]: {reference.shape} vs {candidate.shape}")
    ref, cand = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(ref) * (ref - cand)).sum(axis=-1)
    agree = reference.argmax(axis=-1) == candidate.argmax(axis=-1)
    return {
        "positions": int(len(reference)),
        "top1_agreement": float(agree.mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }
