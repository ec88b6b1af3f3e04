"""The command line without a model: help texts and defaults, -v/-q everywhere, options refused before
any model loads (a bundle that does not exist proves it: the option's error comes first), export and
synth refusals, ``python -m qwenvl_edge``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from qwenvl_edge.cli import COMMANDS, HelpFormatter, build_parser
from tests.cli_helpers import assert_one_line_error, run_cli, run_process, temp_home  # noqa: F401

NO_BUNDLE = ["--bundle", "/nonexistent/qwenvl-bundle"]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_is_registered_and_documented() -> None:
    subs = subparsers()
    assert set(subs) == set(COMMANDS) >= {"synth", "export", "run", "chat", "demo", "verify", "cache", "completion"}
    for name, p in subs.items():
        assert p.description, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    p = subparsers()[name]
    text = p.format_help()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and action.nargs != 0:
            shown = "".join(f"(default: {action.default})".split())
            assert shown in "".join(text.split()), f"{name} {action.option_strings}"  # wrapping ignored
    assert isinstance(p.formatter_class, type) and issubclass(p.formatter_class, HelpFormatter)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_verbose_and_quiet_on_every_command(name: str) -> None:
    options = {o for a in subparsers()[name]._actions for o in a.option_strings}
    assert {"-v", "--verbose", "-q", "--quiet"} <= options


def test_run_usage_names_one_question() -> None:
    usage = subparsers()["run"].format_usage()
    assert "[IMAGE ...] QUESTION" in usage and "--batch FILE.jsonl" in usage
    assert usage.count("QUESTION") == 1


def test_demo_offers_only_options_it_uses() -> None:
    options = {o for a in subparsers()["demo"]._actions for o in a.option_strings}
    assert not options & {"--bundle", "--temperature", "--top-p", "--greedy", "--seed", "--json"}


def test_llm_type_any_case() -> None:
    args = build_parser().parse_args(["export", "ck", "out", "--llm", "q4_k_m"])
    assert args.llm == "Q4_K_M"


def test_python_dash_m(tmp_path: Path) -> None:
    done = run_process(["--help"])
    assert done.returncode == 0 and "usage: qwenvl-edge" in done.stdout.decode()
    done = run_process(["run", "--help"])
    assert done.returncode == 0 and "(default: 2048)" in done.stdout.decode()


# --- refused before the model loads -------------------------------------------------------------

@pytest.mark.parametrize("n_ctx, hint", [("100", "try 256"), ("300", "try 256 or 512"), ("64", "try 256"),
                                         ("10", "try 256"), ("100000000", "over")])
def test_bad_n_ctx_is_refused_before_loading(n_ctx: str, hint: str, capsys) -> None:
    rc, _, err = run_cli(["run", *NO_BUNDLE, "--n-ctx", n_ctx, "hi"], capsys)
    assert_one_line_error(rc, err, "n_ctx", hint)
    assert "llm.gguf" not in err and "bundle" not in err


@pytest.mark.parametrize("option, value, fragment", [
    ("--temperature", "nan", "temperature must be a finite number"),
    ("--temperature", "-0.5", "temperature must be >= 0"),
    ("--temperature", "inf", "temperature"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
    ("--top-p", "1.5", "top_p"),
    ("--top-p", "nan", "top_p"),
    ("--threads", "1000", "n_threads must be between 1 and"),
    ("--threads", "0", "n_threads"),
    ("--max-tokens", "0", "max_tokens"),
    ("--seed", "-1", "seed"),
])
def test_bad_sampling_and_threads_refused_before_loading(option: str, value: str, fragment: str, capsys) -> None:
    for command in (["run", "hi"], ["chat"]):
        rc, _, err = run_cli([command[0], *NO_BUNDLE, option, value, *command[1:]], capsys)
        assert_one_line_error(rc, err, fragment)


def test_draw_without_an_image_fails_at_once(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(["run", *NO_BUNDLE, "--draw", str(tmp_path / "b.png"), "Find <ref>it</ref>"], capsys)
    assert_one_line_error(rc, err, "--draw needs an image")
    assert not (tmp_path / "b.png").exists()
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    rc, _, err = run_cli(["run", *NO_BUNDLE, "--draw", str(tmp_path / "no" / "b.png"), str(image), "Find it"], capsys)
    assert_one_line_error(rc, err, "--draw", "no folder")


def test_a_missing_question_is_an_error(capsys) -> None:
    """Only no argument at all lacks a question: the last argument is always the question (what looks like a
    file name is asked as it is; tests/test_cli_inputs_run.py)."""
    rc, _, err = run_cli(["run", *NO_BUNDLE], capsys)
    assert_one_line_error(rc, err, "no question")


def test_missing_image_is_named(capsys) -> None:
    rc, _, err = run_cli(["run", *NO_BUNDLE, "nothere.png", "what is it?"], capsys)
    assert_one_line_error(rc, err, "nothere.png", "no such image file")


def test_invalid_utf8_question_is_one_line(tmp_path: Path) -> None:
    done = run_process(["run", *NO_BUNDLE, "-"], stdin=b"caf\xe9 \xff?\n")
    err = done.stderr.decode()
    assert_one_line_error(done.returncode, err, "not valid UTF-8")
    done = run_process(["run", *NO_BUNDLE, b"caf\xe9?".decode("utf-8", "surrogateescape")])
    assert_one_line_error(done.returncode, done.stderr.decode(), "not valid UTF-8")


@pytest.mark.parametrize("lines, fragment", [
    (["", "not json"], "jobs.jsonl:2: not a JSON object"),
    (['{"images": "a.png", "question": "hi"}'], "jobs.jsonl:1: images must be a list"),
    (['{"images": ["nothere.png"], "question": "hi"}'], "nothere.png: no such image file"),
    (['{"question": "  "}'], "jobs.jsonl:1: question is empty"),
    (['{"question": 3}'], "question must be a string"),
    (['{"question": "hi", "temperature": 0}'], "jobs.jsonl:1: expected"),
    (["", "  "], "no questions"),
])
def test_bad_batch_lines_are_refused_before_loading(lines: list[str], fragment: str, tmp_path: Path,
                                                     capsys) -> None:
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    rc, out, err = run_cli(["run", *NO_BUNDLE, "--batch", str(batch)], capsys)
    assert_one_line_error(rc, err)
    assert "qwenvl-bundle" not in err  # no line was good: the model was never opened
    assert fragment in (json.loads(out)["error"] if out else err)  # the bad line's error takes its place


def test_batch_refuses_other_arguments(tmp_path: Path, capsys) -> None:
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(json.dumps({"question": "hi"}) + "\n")
    rc, _, err = run_cli(["run", *NO_BUNDLE, "--batch", str(batch), "hi"], capsys)
    assert_one_line_error(rc, err, "--batch")
    rc, _, err = run_cli(["run", *NO_BUNDLE, "--batch", str(batch), "--draw", "x.png"], capsys)
    assert_one_line_error(rc, err, "--draw")


def test_chat_refuses_a_non_image_before_loading(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    rc, _, err = run_cli(["chat", *NO_BUNDLE, str(bad)], capsys)
    assert_one_line_error(rc, err, "notes.png")


# --- export and synth ---------------------------------------------------------------------------

@pytest.mark.parametrize("extra, fragment", [
    ([], "the dynamic-u8 scheme would ignore it"),
    (["--vision-scheme", "dynamic-u8"], "the dynamic-u8 scheme"),
    (["--vision", "fp32"], "--vision fp32 would ignore it"),
])
def test_export_refuses_calibration_images_a_scheme_ignores(extra: list[str], fragment: str, tmp_path: Path,
                                                            capsys) -> None:
    image = tmp_path / "cal.png"
    Image.new("RGB", (8, 8)).save(image)
    rc, _, err = run_cli(["export", str(tmp_path / "ck"), str(tmp_path / "out"), "--calibration-image", str(image),
                          *extra], capsys)
    assert_one_line_error(rc, err, "--calibration-image", fragment)
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_unknown_llm_type(tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(tmp_path / "out"), "--llm", "iq2_xxs"], capsys)
    assert_one_line_error(rc, err, "IQ2_XXS", "Q4_K_M")


def test_synth_refuses_a_folder_that_holds_files(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    rc, _, err = run_cli(["synth", str(folder)], capsys)
    assert_one_line_error(rc, err, "not an empty folder")
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    (tmp_path / "file").write_text("x")
    rc, _, err = run_cli(["synth", str(tmp_path / "file")], capsys)
    assert_one_line_error(rc, err, "not an empty folder")
