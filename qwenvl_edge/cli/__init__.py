"""``qwenvl-edge``: one console script, one subcommand per job.

The only place that reads argv and prints errors: anything a user got wrong arrives as a
``QwenVLError`` and leaves as one line on stderr with exit code 2, never a traceback.

Adding a subcommand takes two functions: ``@command("name", _body("name"))`` on the function that
adds its arguments (its docstring is the help; its options come from the table in
``qwenvl_edge/options.py``, which declares each option once: flags, default, help, environment
variable and check; ``main`` checks them all before the command runs), and ``cmd_name(args) -> int``
in ``qwenvl_edge/cli/commands.py`` (or in the module given to ``_body``, e.g.
``_body("serve", "qwenvl_edge.server.main")``), imported only when that command runs, so
``qwenvl-edge run`` never loads the export side (onnx, gguf). Every command gets ``-v/--verbose`` and
``-q/--quiet`` (``args.verbose``, ``args.quiet``), before or after its name: do not add them again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qwenvl_edge import __version__, options
from qwenvl_edge.errors import OptionError, QwenVLError

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


# --- the commands' arguments ---------------------------------------------------------------------

@command("synth", _body("synth"))
def _synth_args(p: argparse.ArgumentParser) -> None:
    """Write a random-weight checkpoint in the real Qwen-VL-Chat layout (tests, demo, benchmarks)."""
    p.add_argument("out", type=Path, help="the checkpoint folder to write (new or empty)")
    options.add(p, "preset", "weights_seed", "format", "shard_mb", "tiktoken", "override")


@command("export", _body("export"))
def _export_args(p: argparse.ArgumentParser) -> None:
    """Export a Qwen-VL-Chat checkpoint folder into a bundle (vision ONNX + LLM GGUF + manifest)."""
    p.add_argument("checkpoint", type=Path, help="the downloaded Qwen-VL-Chat folder")
    p.add_argument("out", type=Path, help="the bundle folder to write")
    options.add(p, "vision", "vision_scheme", "int8_floor", "calibration_image", "llm", "keep_fp32_vision", "threads",
                "force", "fresh")


@command("run", _body("run"))
def _run_args(p: argparse.ArgumentParser) -> None:
    """Answer one question about images (streams the answer), or a batch of them from a JSONL file."""
    p.usage = "%(prog)s [options] [IMAGE ...] QUESTION\n       %(prog)s [options] --batch FILE.jsonl"
    p.add_argument("items", nargs="*", metavar="IMAGE ... QUESTION",
                   help="images, then the question: the last argument is always the question, whatever it looks like "
                        "(never looked up as a file); '-' reads the question from stdin")
    options.add(p, "bundle", *options.MODEL, *options.SAMPLING, "batch", "json", "draw", "keep_vision", "json_schema",
                "no_resident")


@command("chat", _body("chat", "qwenvl_edge.cli.chat"))
def _chat_args(p: argparse.ArgumentParser) -> None:
    """Interactive multi-turn chat about images (earlier turns stay in the KV cache); /help lists its commands."""
    p.add_argument("images", nargs="*", metavar="IMAGE", help="images for the first question")
    options.add(p, "bundle", *options.MODEL, *options.SAMPLING, "release_vision", "no_resident")


@command("batch", _body("batch", "qwenvl_edge.batch.command"))
def _batch_args(p: argparse.ArgumentParser) -> None:
    """Answer every row of IN (JSONL or Parquet) into OUT, resumably: here, or on a Ray cluster with --ray."""
    p.add_argument("input", type=Path, metavar="IN",
                   help='JSONL lines {"id": ..., "images": [...], "question": "..."} (id optional: the line number), '
                        "or a .parquet file with the columns id, images and question")
    p.add_argument("output", type=Path, metavar="OUT",
                   help="JSONL file, or a .parquet folder of part files; the ids already in it are skipped")
    options.add(p, "bundle", "ray", "actors", "threads_per_actor", "batch_size", "n_ctx", "max_tokens", "no_cache",
                "load", *options.SAMPLING)


@command("demo", _body("demo"))
def _demo_args(p: argparse.ArgumentParser) -> None:
    """Rebuild the tiny trained Qwen-VL from its shipped weights, export it, and ask it its three tasks."""
    options.add(p, "dir", "question", "demo_draw", "llm", "rebuild", *options.MODEL)  # no --bundle: it builds one
    p.set_defaults(greedy=True, keep_vision=False, temperature=0.0, top_p=None, seed=0, batch=None, json=False)


@command("eval", _body("eval"))
def _eval_args(p: argparse.ArgumentParser) -> None:
    """Quality report of a bundle against its float reference: vision rows, next-token KL, task accuracy."""
    p.add_argument("bundle", type=Path, help="the bundle to judge (e.g. the default INT8 + Q4_K_M export)")
    options.add(p, "reference")
    options.add(p, "images", "task", group=p.add_mutually_exclusive_group())
    options.add(p, "n", "image_seed", "threads", "report_json")


@command("verify", _body("verify"))
def _verify_args(p: argparse.ArgumentParser) -> None:
    """Check every bundle file against the manifest's sha256."""
    options.add(p, "bundle")


@command("cache", _body("cache"))
def _cache_args(p: argparse.ArgumentParser) -> None:
    """Show the on-disk cache (image rows, prefix states, export resume folders) and its size per kind, or clear it."""
    p.add_argument("action", nargs="?", choices=["show", "clear"], default="show",
                   help="show: location and size per kind; clear: delete the cached entries")
    options.add(p, "kind")


@command("completion", _body("completion"))
def _completion_args(p: argparse.ArgumentParser) -> None:
    """Print a shell completion script: eval "$(qwenvl-edge completion bash)" (or zsh)."""
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")


@command("serve", _body("serve", "qwenvl_edge.cli.resident"))
def _serve_args(p: argparse.ArgumentParser) -> None:
    """Serve OpenAI's chat API and a photo page (http://127.0.0.1:8000/); needs the `server` extra."""
    from qwenvl_edge.server.options import add_serve_args

    add_serve_args(p)


@command("ps", _body("ps", "qwenvl_edge.cli.resident"))
def _ps_args(p: argparse.ArgumentParser) -> None:
    """List the resident servers (serve, serve --background): pid, URL, model loaded or not, idle time, bundle."""


@command("stop", _body("stop", "qwenvl_edge.cli.resident"))
def _stop_args(p: argparse.ArgumentParser) -> None:
    """Stop a resident server (SIGTERM, then wait for it to exit): the only one running, --bundle's, or --all."""
    options.add(p, "stop_bundle", "stop_all", group=p.add_mutually_exclusive_group())


# --- the parser ----------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter for the arguments outside the option table (whose help already states
    its one default), minus the noise of "(default: None)", "(default: False)" and a switch's "(default: True)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0 or "(default:" in text
                or "%(default)" in text):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line ``qwenvl-edge: error: ...`` (``main`` prints it), exit 2."""

    def error(self, message: str):
        raise OptionError(f"{message} (see: {self.prog} --help)")


def _verbosity(parser: argparse.ArgumentParser, **kw) -> None:
    """-v/-q, on the main parser and on every command: ``qwenvl-edge -q run`` = ``qwenvl-edge run -q``."""
    options.add(parser, "verbose", "quiet", group=parser.add_mutually_exclusive_group(), **kw)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, from the option table; ``parser.command_options`` names each one's options."""
    parser = Parser(prog="qwenvl-edge", description="Qwen-VL-Chat on a CPU.", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"qwenvl-edge {__version__}")
    _verbosity(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.command_options = {}
    for name, (add_args, _) in COMMANDS.items():
        doc = (add_args.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=HelpFormatter)
        _verbosity(p, default=argparse.SUPPRESS)  # unset unless given here, so the main parser's value stays
        add_args(p)
        parser.command_options[name] = options.names_of(p)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The namespace a command gets: parsed, environment defaults filled in, every option checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        raise OptionError("-v/--verbose and -q/--quiet cannot be used together")
    options.check(args, parser.command_options[args.command])
    return args


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed by now
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
    try:
        args = parse_args(argv)
        setup_logging(args.verbose, args.quiet)
        return COMMANDS[args.command][1]()(args)
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
