"""``qwenvl-edge run IMAGE ... QUESTION`` (issue 24): the last argument is always the question, whatever it
looks like; the file system is never asked about it. On the real tiny bundle."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.cli_helpers import assert_one_line_error, run_cli, run_process, temp_home  # noqa: F401

ARGS = ["--greedy", "--max-tokens", "3", "--no-cache", "--threads", "2"]


def answered(rc: int, out: str, err: str, images: int) -> None:
    assert rc == 0, err
    assert out.count("\n") == 1 and out.strip(), out  # one streamed answer
    assert f"({images} encoded, 0 cached)" in err, err


@pytest.mark.parametrize("question", ["what is in cat.jpg", "cat.JPG", "photo.png", "IMG_0001.jpeg?"])
def test_a_question_that_looks_like_a_file_name_is_asked(f32_bundle: Path, golden, question: str, capsys) -> None:
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), *ARGS, str(golden.images["sign"]), question], capsys)
    answered(rc, out, err, images=1)


def test_a_question_naming_an_existing_image_is_still_the_question(f32_bundle: Path, golden, tmp_path: Path,
                                                                   capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sign.png").write_bytes(golden.images["sign"].read_bytes())
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), *ARGS, "sign.png"], capsys)
    answered(rc, out, err, images=0)  # text only: "sign.png" was asked, not encoded
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), *ARGS, "sign.png", "sign.png"], capsys)
    answered(rc, out, err, images=1)


@pytest.mark.parametrize("question", [
    "Read this: " + "=" * 100_000,  # 100 kB on the command line (1 600 tokens: it fits the context)
    "Is this long? " + " " * 100_000 + "Answer.",
    "x" * 300,  # over the 255-byte limit of a file name
])
def test_a_long_question_from_argv_is_answered(f32_bundle: Path, question: str) -> None:
    done = run_process(["run", "--bundle", str(f32_bundle), *ARGS, question])
    err = done.stderr.decode()
    assert done.returncode == 0 and "File name too long" not in err, err
    assert done.stdout.decode().count("\n") == 1


def test_stdin_question_and_image_checks_stay(f32_bundle: Path, golden, tmp_path: Path, capsys,
                                              monkeypatch) -> None:
    """``-`` still reads the question; the arguments before the question are still images, checked at once."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"what is in cat.jpg\n")))
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), *ARGS, str(golden.images["sign"]), "-"], capsys)
    answered(rc, out, err, images=1)
    for image, fragment in [(str(tmp_path / ("y" * 300 + ".png")), "File name too long"),
                            (str(tmp_path), "a folder, not an image file"),
                            (str(tmp_path / "missing.jpg"), "no such image file")]:
        rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), *ARGS, image, "what is it?"], capsys)
        assert_one_line_error(rc, err, fragment)
        assert out == ""
