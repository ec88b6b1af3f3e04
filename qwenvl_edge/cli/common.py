"""What ``run``, ``chat`` and ``demo`` share: option checks before any model loads, opening the
model, sampling arguments, and the stderr lines (silenced by ``-q``).

Option values are checked by the option table (``qwenvl_edge.options``, with ``qwenvl_edge.validate``'s
checks) before the bundle's engines load, so a bad ``--n-ctx`` costs milliseconds, not a model load.
"""

from __future__ import annotations

import argparse
import sys

from qwenvl_edge import options

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic"}


def say(a: argparse.Namespace, message: str) -> None:
    """A status line on stderr (stdout carries only answers); nothing with ``-q``."""
    if not getattr(a, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def check_model_options(a: argparse.Namespace) -> None:
    """Every option of a model command, checked before the model loads (raises ``QwenVLError``).

    ``main`` has already run these checks (``options.check``); they are idempotent, so a command body
    called with a namespace of its own is checked the same way."""
    options.check(a, (*options.MODEL, *options.SAMPLING))


def open_model(a: argparse.Namespace):
    from qwenvl_edge.runtime.pipeline import QwenVL

    return QwenVL(a.bundle, n_threads=a.threads, n_ctx=a.n_ctx, keep_vision=a.keep_vision,
                  cache_dir=None if a.no_cache else default_cache(), seed=a.seed, verbose=a.verbose,
                  use_mmap=a.load == "map", repack=a.load == "read")


def default_cache():
    from qwenvl_edge.runtime.store import default_store_dir

    return default_store_dir()


def sampling(a: argparse.Namespace) -> dict:
    return {"max_tokens": a.max_tokens, "temperature": 0.0 if a.greedy else a.temperature, "top_p": a.top_p}


def print_timings(a: argparse.Namespace, result) -> None:
    t = result.timings
    say(a, f"[load {t.load_s:.2f} s, image encode {t.image_encode_s:.2f} s ({t.images_encoded} encoded, "
           f"{t.images_from_cache} cached), restored {t.restored_positions} pos, "
           f"prefill {t.prefill_positions} pos in {t.prefill_s:.2f} s, first token {t.ttft_s:.2f} s, "
           f"decode {t.decode_tokens} tok at {t.decode_tok_s:.1f} tok/s]")
