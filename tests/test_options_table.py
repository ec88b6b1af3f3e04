"""The option table (qwenvl_edge/options.py): each option declared once, so every command's ``--help`` states
the same one default for it, ``$QWENVL_EDGE_THREADS`` reaches every command with ``--threads``, the registries
name their own types, ``--port`` and the other numbers are checked, -v/-q go before or after the command, and
sampling without ``--seed`` is random."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_edge import options, validate
from qwenvl_edge.cli import COMMANDS, main, parse_args
from tests.cli_helpers import assert_one_line_error, run_cli, temp_home  # noqa: F401

THREADS_COMMANDS = {"run": ["run", "hi"], "chat": ["chat"], "demo": ["demo"], "eval": ["eval", "b"],
                    "serve": ["serve"], "export": ["export", "ck", "out"]}
DEFAULT_WORD = re.compile(r"\bdefault\b")


def help_lines(command: str, capsys, monkeypatch) -> dict[str, str]:
    """``qwenvl-edge COMMAND --help`` as printed, parsed: each option's first flag -> its whole help text."""
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a help text
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    entries: dict[str, str] = {}
    flag = None
    for line in out.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):  # "  --n-ctx N_CTX    its help": the invocation, 2+ spaces, the help
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            flag = parts[0].split()[0].rstrip(",")
            entries[flag] = parts[1] if len(parts) > 1 else ""
        elif flag and line.startswith("   "):
            entries[flag] = (entries[flag] + " " + line.strip()).strip()
    return entries


def stated_default(text: str) -> str | None:
    m = re.search(r"\(default: (.*)\)$", text)
    return m.group(1) if m else None


def key_of(command: str, flag: str) -> str:
    """The table key behind ``flag`` in ``command`` (``--seed`` is three options: sampling, weights, images)."""
    parser = argparse.ArgumentParser(prog=f"qwenvl-edge {command}")
    COMMANDS[command][0](parser)
    [key] = [k for k in options.names_of(parser) if flag in options.OPTIONS[k].flags]
    return key


def test_every_help_states_one_true_default_per_option(capsys, monkeypatch) -> None:
    seen: dict[str, dict[str, str | None]] = {}
    for command in sorted(COMMANDS):
        for flag, text in help_lines(command, capsys, monkeypatch).items():
            if flag in ("-h", "-v", "-q"):
                continue
            assert len(DEFAULT_WORD.findall(text)) <= 1 and "unset" not in text, f"{command} {flag}: {text}"
            key = key_of(command, flag)
            opt = options.OPTIONS[key]
            shown = stated_default(text)
            assert shown == opt.shown_for(command), f"{command} {flag}: {text}"
            if opt.action in options.FLAG_ACTIONS:
                assert "default" not in text, f"{command} {flag}: a switch states no default: {text}"
            if command not in opt.per_command:
                seen.setdefault(key, {})[command] = shown
    for key, by_command in seen.items():
        assert len(set(by_command.values())) == 1, f"{key}: {by_command}"
    # the options the issue names, in every command that has them
    assert seen["n_ctx"] == dict.fromkeys(["batch", "chat", "demo", "run", "serve"], str(validate.DEFAULT_N_CTX))
    assert seen["threads"] == dict.fromkeys(THREADS_COMMANDS, "$QWENVL_EDGE_THREADS, else every usable core")


@pytest.mark.parametrize("command, flag, want", [
    ("chat", "--release-vision", None), ("run", "--keep-vision", None),
    ("demo", "--max-tokens", "48"), ("eval", "--task", "synthetic"), ("run", "--load", "map"),
    ("chat", "--load", "read"), ("run", "--max-tokens", "the model's max_new_tokens, 512"),
])
def test_switches_and_per_command_defaults_state_one_default(command: str, flag: str, want: str | None, capsys,
                                                             monkeypatch) -> None:
    text = help_lines(command, capsys, monkeypatch)[flag]
    assert stated_default(text) == want and text.count("default") == (want is not None), text


@pytest.mark.parametrize("command", sorted(THREADS_COMMANDS))
def test_threads_environment_reaches_every_command(command: str, monkeypatch) -> None:
    argv = THREADS_COMMANDS[command]
    monkeypatch.delenv(options.ENV_THREADS, raising=False)
    assert parse_args(argv).threads is None
    monkeypatch.setenv(options.ENV_THREADS, " 1 ")
    assert parse_args(argv).threads == 1
    assert parse_args([*argv, "--threads", "2"]).threads == 2  # the option wins over the environment


@pytest.mark.parametrize("value, fragment", [("abc", "must be a whole number"), ("0", "n_threads must be between"),
                                             ("100000", "n_threads must be between"), ("1.5", "whole number")])
def test_a_bad_threads_environment_is_one_line_everywhere(value: str, fragment: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv(options.ENV_THREADS, value)
    for command, argv in THREADS_COMMANDS.items():
        rc, out, err = run_cli(argv, capsys)
        assert_one_line_error(rc, err, "$QWENVL_EDGE_THREADS", fragment)
        assert out == "", command


def test_threads_environment_in_a_real_run(f32_bundle: Path, golden, capsys, monkeypatch) -> None:
    monkeypatch.setenv(options.ENV_THREADS, "1")
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), "--greedy", "--no-cache", "--json",
                            "--max-tokens", "4", "Hello! Who are you?"], capsys)
    assert rc == 0, err
    assert json.loads(out)["token_ids"] == golden.cases["text_only"]["generated_ids"][:4]
    monkeypatch.setenv(options.ENV_THREADS, "-3")
    rc, _, err = run_cli(["run", "--bundle", str(f32_bundle), "--greedy", "hi"], capsys)
    assert_one_line_error(rc, err, "$QWENVL_EDGE_THREADS='-3'", "n_threads")


# --- -v / -q before or after the command -----------------------------------------------------------

@pytest.mark.parametrize("argv, verbose, quiet", [
    (["-q", "run", "hi"], False, True), (["run", "-q", "hi"], False, True), (["--quiet", "chat"], False, True),
    (["-v", "eval", "b"], True, False), (["serve", "--verbose"], True, False), (["verify"], False, False),
    (["-q", "cache", "show", "-q"], False, True),
])
def test_verbose_and_quiet_before_or_after_the_command(argv: list[str], verbose: bool, quiet: bool) -> None:
    args = parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


@pytest.mark.parametrize("argv", [["-q", "run", "-v", "hi"], ["-v", "-q", "verify"], ["run", "-q", "-v", "hi"]])
def test_verbose_with_quiet_is_one_line(argv: list[str], capsys) -> None:
    rc, _, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, "-v/--verbose", "-q/--quiet")


def test_quiet_before_the_command_in_a_real_run(f32_bundle: Path, golden, capsys) -> None:
    rc, out, err = run_cli(["-q", "run", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "24", "--no-cache",
                            "Hello! Who are you?"], capsys)
    assert rc == 0 and err == ""  # no timings line: -q reached the command
    assert out == golden.cases["text_only"]["generated_text"] + "\n"


# --- checked numbers --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["serve", "--port", "70000"], "port must be in 1 .. 65535"),
    (["serve", "--port", "65536"], "port"),
    (["serve", "--port", "-1"], "port"),
    (["serve", "--max-queue", "-1"], "--max-queue must be at least 0"),
    (["serve", "--max-images", "0"], "--max-images must be at least 1"),
    (["serve", "--request-timeout", "nan"], "--request-timeout must be a finite number"),
    (["serve", "--max-body-mb", "0"], "--max-body-mb must be a positive number"),
    (["serve", "--threads", "0"], "n_threads"),
    (["serve", "--n-ctx", "1000"], "n_ctx must be a multiple of 256"),
    (["eval", "b", "--n", "0"], "--n must be at least 1"),
    (["eval", "b", "--seed", "-2"], "seed"),
    (["synth", "out", "--shard-mb", "-1"], "--shard-mb must be at least 0"),
    (["export", "ck", "out", "--threads", "0"], "n_threads"),
    (["demo", "--n-ctx", "300"], "try 256 or 512"),
    (["export", "ck", "out", "--llm", "iq2_xxs"], "invalid choice: 'IQ2_XXS'"),
    (["export", "ck", "out", "--vision-scheme", "dynamic-u4"], "dynamic-u8"),
    (["serve", "--port", "eighty"], "invalid int value"),
])
def test_bad_numbers_and_names_are_one_line_before_anything_runs(argv: list[str], fragment: str, tmp_path: Path,
                                                                 capsys, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc, out, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, fragment)
    assert out == "" and list(work.iterdir()) == []  # nothing written (synth's and export's "out" included)


@pytest.mark.parametrize("port", ["0", "1", "65535", "8000"])
def test_good_ports_pass(port: str) -> None:
    assert parse_args(["serve", "--port", port]).port == int(port)


# --- registries and the engine's defaults -----------------------------------------------------------

def test_llm_types_and_schemes_come_from_their_registries(capsys, monkeypatch) -> None:
    from qwenvl_edge.quant.gguf_quant import LLM_TYPES
    from qwenvl_edge.quant.onnx_int8 import DEFAULT_SCHEME, SCHEMES

    llm = options.OPTIONS["llm"]
    assert llm.choices == tuple(LLM_TYPES) and llm.default == next(iter(LLM_TYPES))
    assert options.OPTIONS["vision_scheme"].choices == tuple(SCHEMES)
    lines = help_lines("export", capsys, monkeypatch)
    assert all(name in lines["--llm"] for name in LLM_TYPES)
    assert all(name in lines["--vision-scheme"] for name in SCHEMES)
    assert stated_default(lines["--vision-scheme"]) == DEFAULT_SCHEME
    assert parse_args(["export", "ck", "out", "--llm", "iq4_nl"]).llm == "IQ4_NL"
    assert parse_args(["demo", "--llm", "q8_0"]).llm == "Q8_0"


def test_parsing_imports_no_engine() -> None:
    code = ("import sys; from qwenvl_edge.cli import parse_args, build_parser; build_parser().format_help(); "
            "[parse_args(a) for a in (['export', 'c', 'o'], ['serve'], ['run', 'hi'], ['demo'], ['eval', 'b'])]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'numpy', 'onnx', 'onnxruntime', 'gguf', 'llama_cpp', 'PIL', 'fastapi', 'uvicorn'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_engine_reads_the_same_n_ctx_default() -> None:
    from qwenvl_edge.runtime.decoder import Decoder
    from qwenvl_edge.runtime.pipeline import QwenVL
    from qwenvl_edge.runtime.session import Session

    for cls in (QwenVL, Session, Decoder):
        assert inspect.signature(cls.__init__).parameters["n_ctx"].default == options.OPTIONS["n_ctx"].default
    repo = Path(__file__).resolve().parents[1]
    for path in ("qwenvl_edge/cli/__init__.py", "server/options.py", "runtime/pipeline.py", "runtime/session.py",
                 "runtime/decoder.py", "qwenvl_edge/evaluation/evaluate.py"):
        assert not re.search(r"n_ctx\W+2048|=\s*2048\b", (repo / path).read_text()), path


# --- the seed ---------------------------------------------------------------------------------------

def test_seed_is_random_unless_given(capsys, monkeypatch) -> None:
    assert parse_args(["run", "hi"]).seed is None and parse_args(["chat"]).seed is None
    assert parse_args(["run", "--seed", "7", "hi"]).seed == 7
    assert "random" in help_lines("run", capsys, monkeypatch)["--seed"]


def test_sampled_runs_differ_without_seed_and_repeat_with_one(f32_bundle: Path, capsys) -> None:
    def answer(*extra: str) -> list[int]:
        rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), "--no-cache", "--json", "--max-tokens", "12",
                                "--temperature", "5", "--top-p", "1", *extra, "Hello! Who are you?"], capsys)
        assert rc == 0, err
        return json.loads(out)["token_ids"]

    assert len({tuple(answer()) for _ in range(3)}) > 1  # 3 runs x 12 tokens from a near-flat distribution
    assert answer("--seed", "7") == answer("--seed", "7")
