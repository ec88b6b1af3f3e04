"""The ``serve`` command's options and the limits they set.

Stdlib only: the CLI builds its parser from here for every command, so nothing heavy may be
imported at this level. The limits have one home (``Limits``) so the request checks, the
page and the docs read the same numbers.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

MODEL_ID = "qwen-vl-chat"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Past these the request is refused before it reaches the model."""

    max_body_bytes: int = 32 * 2**20  # a 10 MB photo grows by 4/3 as base64, with room for a second one
    max_images: int = 4  # each image costs 258 of the 2048 context positions
    max_image_pixels: int = 40_000_000  # under Pillow's decompression-bomb limit (89 M)
    remote_max_bytes: int = 10 * 2**20  # as llama-server and vLLM
    remote_timeout_s: float = 10.0
    max_queue: int = 8  # requests waiting behind the one being decoded; past it: 503 + Retry-After
    request_timeout_s: float = 600.0  # a generation running longer is ended with an error


@dataclass(frozen=True)
class ServeConfig:
    """Everything the app needs besides the engine: who may call, where images may come from, limits."""

    model_id: str = MODEL_ID
    api_key: str | None = None
    media_dir: Path | None = None
    allow_remote_images: bool = False
    limits: Limits = Limits()
    cors_origins: tuple[str, ...] = ()  # browser pages from these origins may call the API (none by default)
    parallel: int = 1  # requests decoded together, one sequence each of one llama.cpp context


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The ``serve`` options, from the CLI's option table (their defaults come from ``Limits`` and ``MODEL_ID``
    here; the server reads them in ``config_from_args``)."""
    from qwenvl_edge import options  # imports this module for the defaults: not at the top

    options.add(p, *options.SERVE)


def config_from_args(a: argparse.Namespace) -> ServeConfig:
    limits = Limits(max_body_bytes=int(a.max_body_mb * 2**20), max_images=a.max_images,
                    max_image_pixels=a.max_image_pixels, max_queue=a.max_queue,
                    remote_max_bytes=int(a.remote_max_mb * 2**20), remote_timeout_s=a.remote_timeout,
                    request_timeout_s=a.request_timeout)
    media = a.media_dir.expanduser().resolve() if a.media_dir else None
    return ServeConfig(model_id=a.model_name, api_key=a.api_key, media_dir=media,
                       allow_remote_images=a.allow_remote_images, limits=limits,
                       cors_origins=tuple(getattr(a, "cors_origin", None) or ()), parallel=a.parallel or 1)
