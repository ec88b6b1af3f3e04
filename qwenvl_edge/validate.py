"""The one place where external inputs (CLI options, API arguments) are checked.

The engine and the CLI call these functions instead of checking on their own, so a new option
cannot skip validation. Each returns the normalised value or raises a ``QwenVLError`` subclass
with a one-line message naming the argument. ``None`` passes through wherever the API treats it
as "use the default" (the caller resolves the default); ``question`` and ``image_list`` are the
exceptions.

Rules (the README's "What is validated" section repeats them):

- integers are Python/numpy integers, never ``bool``, ``float`` or ``str`` (``max_tokens="3"`` is
  refused rather than guessed);
- ``n_ctx``: a multiple of 256 (llama.cpp pads its context to 256 positions, so any other value would
  silently become another one), at least 256, at most ``4 x seq_length`` of the model when it is known
  (past ``seq_length`` llama.cpp lacks the original's logn/NTK scaling) and never over ``N_CTX_MAX``;
  with ``kv_bytes_per_position`` the KV cache must also fit in half the machine's memory, so a huge
  value is refused before llama.cpp allocates anything;
- ``n_threads``: 1 .. ``4 x`` the usable CPU cores (more threads than that only contend: 1000 threads on
  2 cores spin for minutes);
- ``temperature``: finite, >= 0 (0 = greedy); ``top_p``: finite, in (0, 1]; ``top_k``: int >= 0;
  ``max_tokens``: int >= 1; ``seed``: int in [0, 2**32) (llama.cpp's seed is 32-bit unsigned) or None;
- ``port``: int in [1, 65535], or 0 for a free port; ``positive``: finite > 0; ``int_at_least``: a floor;
- ``question``: a ``str`` that encodes as UTF-8 (invalid UTF-8 on the command line arrives as lone
  surrogates and is refused) and is not blank;
- ``image_list``: a list or tuple (a bare string or path is refused: it is one image, not a list).

Files the user hands over (checkpoint config and index, bundle manifest) go through ``json_file``
(any JSON failure, deep nesting included, becomes the caller's error class) and ``plain_name`` (a
file name listed inside them must name a file in the same folder: no ``/``, ``..`` or absolute path).
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Callable
from numbers import Real
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

from qwenvl_edge.errors import ImageError, OptionError, PromptError, QwenVLError

DEFAULT_N_CTX = 2048  # the engine's context length: QwenVL, Session, Decoder and every --n-ctx read this
N_CTX_STEP = 256
N_CTX_MAX = 131072
N_CTX_SEQ_FACTOR = 4
THREADS_PER_CORE = 4
SEED_LIMIT = 2**32
PORT_MAX = 65535


def _int(name: str, value: Any) -> int:
    """An integer argument: ints and numpy integers, never bool, float or str."""
    if isinstance(value, bool):
        raise OptionError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise OptionError(f"{name} must be an integer, got {_show(value)}") from None


def _real(name: str, value: Any) -> float:
    """A finite real number: ints and floats (numpy too), never bool or str."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise OptionError(f"{name} must be a number, got {_show(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise OptionError(f"{name} must be a finite number, got {value!r}")
    return x


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:50]}..."


def usable_cores() -> int:
    """The CPU cores this process may run on (affinity-aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def n_ctx(value: Any, seq_length: int | None = None, kv_bytes_per_position: int | None = None) -> int | None:
    """Context length: a multiple of 256 in [256, limit]; see the module docstring for the limit."""
    if value is None:
        return None
    n = _int("n_ctx", value)
    if n < N_CTX_STEP or n % N_CTX_STEP:
        lower = max(N_CTX_STEP, n // N_CTX_STEP * N_CTX_STEP)
        hint = f"{lower}" if lower >= n else f"{lower} or {lower + N_CTX_STEP}"
        raise OptionError(f"n_ctx must be a multiple of {N_CTX_STEP} and at least {N_CTX_STEP} "
                          f"(llama.cpp pads the context to {N_CTX_STEP}), got {n}: try {hint}")
    limit, why = N_CTX_MAX, "the most qwenvl-edge allows"
    if seq_length is not None and N_CTX_SEQ_FACTOR * seq_length < limit:
        limit, why = N_CTX_SEQ_FACTOR * seq_length, f"{N_CTX_SEQ_FACTOR} x the model's seq_length {seq_length}"
    if n > limit:
        raise OptionError(f"n_ctx {n} is over {limit} ({why})")
    if kv_bytes_per_position:
        need, have = n * kv_bytes_per_position, physical_memory()
        if have and need > have // 2:
            raise OptionError(f"n_ctx {n} needs a {need / 2**30:.1f} GiB KV cache, over half of this machine's "
                              f"{have / 2**30:.1f} GiB memory")
    return n


def physical_memory() -> int | None:
    """Total RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def n_threads(value: Any) -> int | None:
    """Thread count: 1 .. 4 x usable cores; None = the engine's default."""
    if value is None:
        return None
    n = _int("n_threads", value)
    cores = usable_cores()
    limit = THREADS_PER_CORE * cores
    if n < 1 or n > limit:
        raise OptionError(f"n_threads must be between 1 and {limit} ({THREADS_PER_CORE} x the {cores} usable "
                          f"CPU cores), got {n}")
    return n


def temperature(value: Any) -> float | None:
    """Sampling temperature: finite, >= 0 (0 means greedy)."""
    if value is None:
        return None
    x = _real("temperature", value)
    if x < 0:
        raise OptionError(f"temperature must be >= 0 (0 = greedy), got {value!r}")
    return x


def top_p(value: Any) -> float | None:
    """Nucleus mass: finite, in (0, 1]."""
    if value is None:
        return None
    x = _real("top_p", value)
    if not 0 < x <= 1:
        raise OptionError(f"top_p must be in (0, 1], got {value!r}")
    return x


def _int_where(name: str, value: Any, ok: Callable[[int], bool], rule: str) -> int | None:
    if value is None:
        return None
    n = _int(name, value)
    if not ok(n):
        raise OptionError(f"{name} must be {rule}, got {n}")
    return n


def top_k(value: Any) -> int | None:
    """Top-k: int >= 0 (0 = off)."""
    return _int_where("top_k", value, lambda k: k >= 0, ">= 0 (0 = off)")


def max_tokens(value: Any) -> int | None:
    """New-token budget: int >= 1."""
    return _int_where("max_tokens", value, lambda n: n >= 1, "at least 1")


def seed(value: Any) -> int | None:
    """Sampling seed: int in [0, 2**32) or None."""
    return _int_where("seed", value, lambda s: 0 <= s < SEED_LIMIT, f"in [0, {SEED_LIMIT})")


def port(value: Any) -> int | None:
    """TCP port: 1 .. 65535, or 0 for a free one (the OS would wrap 70000 to 4464 without a word)."""
    return _int_where("port", value, lambda n: 0 <= n <= PORT_MAX, f"in 1 .. {PORT_MAX}, or 0 for a free port")


def int_at_least(name: str, value: Any, low: int) -> int | None:
    """A count with a floor (``--n`` >= 1, ``--max-queue`` >= 0, ...)."""
    return _int_where(name, value, lambda n: n >= low, f"at least {low}")


def positive(name: str, value: Any) -> float | None:
    """A size or time limit: a finite number > 0."""
    if value is None:
        return None
    x = _real(name, value)
    if x <= 0:
        raise OptionError(f"{name} must be a positive number, got {value!r}")
    return x


def question(text: Any, name: str = "prompt") -> str:
    """User text: a str that is valid UTF-8 (no lone surrogates) and not blank."""
    if not isinstance(text, str):
        raise PromptError(f"{name} must be a string, got {_show(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{name} is not valid UTF-8 (undecodable byte at character {e.start}); "
                          "check the terminal's encoding") from None
    if not text.strip():
        raise PromptError(f"{name} is empty")
    return text


def image_list(images: Any) -> list:
    """The images argument: None (no images), a list or a tuple; returns a new list."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (str, bytes, PurePath)):
        raise ImageError(f"images must be a list of images, got a single {type(images).__name__}: "
                         f"pass [{_show(images)}]")
    raise ImageError(f"images must be a list or tuple of images, got {_show(images)}")


def json_file(path: Path, error: type[QwenVLError], what: str = "file", max_bytes: int = 64 * 2**20) -> Any:
    """Parse a small JSON file; every way it can be wrong becomes one ``error`` line naming ``path``."""
    bad = f"{path}: corrupt {what}:"
    try:
        size = Path(path).stat().st_size
        if size > max_bytes:
            raise error(f"{bad} {size} bytes, more than such a file can need ({max_bytes})")
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except UnicodeDecodeError:
        raise error(f"{bad} not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise error(f"{bad} not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise error(f"{bad} JSON nested too deeply") from None
    except (IsADirectoryError, PermissionError) as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None


def plain_name(name: Any, where: str, error: type[QwenVLError]) -> str:
    """A file name listed in a manifest or index: a plain name in the same folder, nothing else."""
    if not isinstance(name, str) or not name:
        raise error(f"{where}: file name {_show(name)} is not a non-empty string")
    if (name in (".", "..") or PurePosixPath(name).name != name or PureWindowsPath(name).name != name
            or "\x00" in name):
        raise error(f"{where}: file name {_show(name)} is not a plain file name in the same folder")
    return name
