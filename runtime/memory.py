"""How much memory a turn needs, to choose between overlapping the GGUF read with the encoder or not.

Overlap saves the GGUF load from the time to first token, but holds the vision session (weights
and onnxruntime's prepacked copies) and the decoder (weights, KV cache, compute buffers) at once.
On a device where both do not fit in the memory available now, the low-memory order is kept.
"""

from __future__ import annotations

import os
from pathlib import Path

MARGIN = 1 << 30  # what the OS, Python and the page cache keep needing
VISION_FACTOR = 2.5  # an onnxruntime session holds its weights and prepacked copies (measured at full size)
KV_BYTES = 2  # llama.cpp's F16 KV cache


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux, Android); None where it is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def needed_together(bundle, n_ctx: int) -> int:
    """Bytes for the vision session and the decoder resident at the same time."""
    vision = sum(_size(bundle.folder / name) for name in bundle.manifest.get("files", {})
                 if name.startswith(bundle.vision_path.name))
    config = (bundle.manifest.get("source") or {}).get("config") or {}
    layers = config.get("num_hidden_layers", 32) if isinstance(config, dict) else 32
    kv = 2 * layers * bundle.model.hidden_size * KV_BYTES * n_ctx
    return int(_size(bundle.llm_path) + VISION_FACTOR * vision + kv + MARGIN)


def fits_together(bundle, n_ctx: int) -> bool:
    """Whether encoding and loading may overlap (``QWENVL_EDGE_OVERLAP=0/1`` forces the choice)."""
    forced = os.environ.get("QWENVL_EDGE_OVERLAP")
    if forced in ("0", "1"):
        return forced == "1"
    have = available_bytes()
    return have is not None and have > needed_together(bundle, n_ctx)


def sequences_that_fit(bundle, n_ctx: int, most: int) -> int:
    """How many sequences of ``n_ctx`` positions a batched server can hold beside the model and the vision
    session in the memory available now (at least 1, at most ``most``; 1 where the memory is not known)."""
    have = available_bytes()
    if have is None:
        return 1
    one = needed_together(bundle, n_ctx)
    per_sequence = one - needed_together(bundle, 0)
    return max(1, min(most, 1 + (have - one) // max(1, per_sequence)))
