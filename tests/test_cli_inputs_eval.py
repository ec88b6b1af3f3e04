"""``qwenvl-edge eval`` (issue 24): every input is checked before any model work, each a one-line error with
exit code 2: ``--seed``, ``--n``, the shape of ``questions.json``, and a ``--reference`` of another model
(read from the two manifests, not found out after the whole answer pass)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from qwenvl_edge.errors import QwenVLError
from qwenvl_edge.evaluation.evaluate import evaluate, synthetic_items
from tests.cli_helpers import assert_one_line_error, run_cli, temp_home  # noqa: F401

QUICK = 20  # seconds: opening manifests and reading JSON, never an answer pass


def eval_cli(bundle: Path, args: list[str], capsys) -> tuple[int, str, str, float]:
    started = time.monotonic()
    rc, out, err = run_cli(["eval", str(bundle), "--threads", "1", *args], capsys)
    return rc, out, err, time.monotonic() - started


@pytest.mark.parametrize("args, fragment", [
    (["--seed", "-1"], "seed must be"),
    (["--seed", "-4000000000"], "seed must be"),
    (["--seed", str(2**32)], "seed must be"),
    (["--n", "0"], "--n must be at least 1"),
    (["--n", "-3"], "--n must be at least 1"),
    (["--threads", "0"], "n_threads must be between 1"),
])
def test_bad_counts_are_one_line(f32_bundle: Path, capsys, args: list[str], fragment: str) -> None:
    rc, out, err, seconds = eval_cli(f32_bundle, args, capsys)
    assert_one_line_error(rc, err, fragment)
    assert out == "" and seconds < QUICK


def write_folder(folder: Path, spec: object | bytes) -> Path:
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "red.png")
    path = folder / "questions.json"
    path.write_bytes(spec if isinstance(spec, bytes) else json.dumps(spec).encode())
    return folder


GOOD = {"image": "red.png", "question": "What colour?", "answer": "red"}


@pytest.mark.parametrize("spec, fragment", [
    ({"image": "red.png", "question": "What colour?"}, "not a list of {image, question"),
    (["red.png", "What colour?"], "entry 1: a JSON str, expected an object"),
    ([1, 2], "entry 1: a JSON int"),
    ([], "no questions"),
    ("red.png", "(a JSON str)"),
    ([GOOD, {"image": "red.png"}], "entry 2: question must be a string"),
    ([{"question": "What colour?"}], "entry 1: image must be a file name"),
    ([{**GOOD, "image": ["red.png"]}], "image must be a file name"),
    ([{**GOOD, "image": "blue.png"}], "blue.png: no such image file"),
    ([{**GOOD, "image": "b" * 300 + ".png"}], "no such image file"),
    ([{**GOOD, "question": "  "}], "question is empty"),
    ([{**GOOD, "answer": 3}], "answer must be a string"),
    ([{**GOOD, "box": [1, 2, 3]}], "box must be [x1, y1, x2, y2]"),
    ([{**GOOD, "box": "0,0,4,4"}], "box must be"),
    ([{**GOOD, "task": 7}], "task must be a non-empty string"),
    ([{**GOOD, "anwser": "red"}], "unknown key 'anwser'"),
    (b"[{", "not valid JSON"),
    (b'[{"image": "red.png", "question": "caf\xe9"}]', "not UTF-8"),
])
def test_a_bad_questions_json_is_one_line_before_any_model_work(f32_bundle: Path, tmp_path: Path, capsys,
                                                               spec: object, fragment: str) -> None:
    folder = write_folder(tmp_path / "images", spec)
    rc, out, err, seconds = eval_cli(f32_bundle, ["--images", str(folder)], capsys)
    assert_one_line_error(rc, err, "questions.json", fragment)
    assert out == "" and seconds < QUICK


def test_a_good_questions_json_with_a_box_is_scored(f32_bundle: Path, tmp_path: Path, capsys) -> None:
    folder = write_folder(tmp_path / "images", [GOOD, {**GOOD, "question": "Where?", "box": [0, 0, 8.5, 8]},
                                                {"image": "red.png", "question": "What is it?", "task": "open"}])
    rc, out, err, _ = eval_cli(f32_bundle, ["--images", str(folder), "--json"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["items"] == 3 and report["tasks"]["folder"]["bundle"]["n"] == 2


@pytest.mark.parametrize("extra", [[], ["--n", "400"], ["--images", "FOLDER"]])
def test_a_reference_of_another_model_is_refused_from_the_manifests(f32_bundle: Path, narrow_bundle: Path,
                                                                    tmp_path: Path, capsys,
                                                                    extra: list[str]) -> None:
    """Before the fix the whole answer pass ran first (minutes at --n 400), then the comparison failed."""
    extra = [str(write_folder(tmp_path / "images", [GOOD])) if a == "FOLDER" else a for a in extra]
    rc, out, err, seconds = eval_cli(f32_bundle, ["--reference", str(narrow_bundle), *extra], capsys)
    assert_one_line_error(rc, err, "--reference", "hidden_size 128", "256")
    assert out == "" and seconds < QUICK


def test_the_api_refuses_another_model_before_answering(f32_bundle: Path, narrow_bundle: Path) -> None:
    started = time.monotonic()
    with pytest.raises(QwenVLError, match="hidden_size"):
        evaluate(f32_bundle, synthetic_items(100, 0), narrow_bundle, n_threads=1)
    assert time.monotonic() - started < QUICK + 10  # making the 300 images is all it did
    with pytest.raises(QwenVLError, match="seed must be"):
        synthetic_items(1, -1)
