"""``qwenvl-edge run --batch`` (issue 24): a bad line costs only its own answer, and lines end at ``\\n`` only.
On the real tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import assert_one_line_error, run_cli, temp_home  # noqa: F401

ARGS = ["--greedy", "--max-tokens", "3", "--no-cache", "--threads", "2"]


def run_batch(bundle: Path, batch: Path, capsys) -> tuple[int, list[dict], str]:
    rc, out, err = run_cli(["run", "--bundle", str(bundle), *ARGS, "--batch", str(batch)], capsys)
    return rc, [json.loads(line) for line in out.splitlines()], err


def line(**item) -> bytes:
    return json.dumps(item, ensure_ascii=False).encode()


BAD_LINES = {
    "bad-json": (b'{"question": ', "not a JSON object"),
    "missing-image": (line(images=["missing.png"], question="What?"), "missing.png: no such image file"),
    "extra-key": (line(question="What?", temperature=0), "unknown key 'temperature'"),
    "bad-utf8": (b'{"question": "caf\xe9?"}', "not valid UTF-8"),
    "not-an-object": (b'["What?"]', "got a JSON list"),
    "image-folder": (line(images=["."], question="What?"), "a folder, not an image file"),
    "image-too-long": (line(images=["z" * 300], question="What?"), "File name too long"),
    "empty-question": (line(question="  "), "question is empty"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_a_bad_line_gets_an_error_in_its_place_and_the_rest_is_answered(f32_bundle: Path, golden, tmp_path: Path,
                                                                        capsys, kind: str) -> None:
    bad, fragment = BAD_LINES[kind]
    (tmp_path / "sign.png").write_bytes(golden.images["sign"].read_bytes())
    batch = tmp_path / "jobs.jsonl"
    batch.write_bytes(b"\n".join([line(question="Hello"), bad, b"", line(images=["sign.png"], question="What?")])
                      + b"\n")
    rc, results, err = run_batch(f32_bundle, batch, capsys)
    assert_one_line_error(rc, err, "1 of 3 questions failed")
    assert len(results) == 3
    assert results[1] == {"error": results[1]["error"]} and results[1]["error"].startswith(f"{batch}:2: ")
    assert fragment in results[1]["error"]
    assert "text" in results[0] and results[2]["timings"]["images_encoded"] == 1


def test_every_kind_of_bad_line_in_one_batch_keeps_input_order(f32_bundle: Path, tmp_path: Path, capsys) -> None:
    batch = tmp_path / "jobs.jsonl"
    lines = [line(question="First")] + [bad for bad, _ in BAD_LINES.values()] + [line(question="Last")]
    batch.write_bytes(b"\r\n".join(lines) + b"\r\n")  # Windows line ends: the \r is dropped
    rc, results, err = run_batch(f32_bundle, batch, capsys)
    assert_one_line_error(rc, err, f"{len(BAD_LINES)} of {len(lines)} questions failed")
    assert [("error" in r) for r in results] == [False] + [True] * len(BAD_LINES) + [False]
    for n, (result, (_, fragment)) in enumerate(zip(results[1:-1], BAD_LINES.values(), strict=True), 2):
        assert result["error"].startswith(f"{batch}:{n}: ") and fragment in result["error"]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\u2028\u2029\u0085"])
def test_a_question_holding_a_unicode_line_separator_stays_one_line(f32_bundle: Path, tmp_path: Path, capsys,
                                                                    separator: str) -> None:
    """``str.splitlines`` would cut these lines in two (two error lines, a wrong count, refused whole before)."""
    question = f"First line{separator}second line?"
    batch = tmp_path / "jobs.jsonl"
    batch.write_bytes(line(question=question) + b"\n" + line(question="Hello") + b"\n")
    assert separator.encode() in batch.read_bytes()  # raw in the file, not escaped
    rc, results, err = run_batch(f32_bundle, batch, capsys)
    assert rc == 0, err
    assert len(results) == 2 and all("text" in r for r in results)
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), *ARGS, "--json", question], capsys)
    assert rc == 0, err
    assert json.loads(out)["token_ids"] == results[0]["token_ids"]  # the same question was asked


@pytest.mark.parametrize("control", ["\x1c", "\x1d", "\x1e", "\x0b", "\x0c"])
def test_an_ascii_separator_inside_a_line_is_one_bad_line(f32_bundle: Path, tmp_path: Path, capsys,
                                                         control: str) -> None:
    """Raw control characters are not JSON: one error for the one line, in its place (not two lines)."""
    batch = tmp_path / "jobs.jsonl"
    batch.write_bytes(f'{{"question": "a{control}b"}}\n'.encode() + line(question="Hello") + b"\n")
    rc, results, err = run_batch(f32_bundle, batch, capsys)
    assert_one_line_error(rc, err, "1 of 2 questions failed")
    assert len(results) == 2 and "not a JSON object" in results[0]["error"] and "text" in results[1]


def test_a_byte_order_mark_is_not_a_bad_line(f32_bundle: Path, tmp_path: Path, capsys) -> None:
    batch = tmp_path / "jobs.jsonl"
    batch.write_bytes(b"\xef\xbb\xbf" + line(question="Hello") + b"\n")
    rc, results, err = run_batch(f32_bundle, batch, capsys)
    assert rc == 0 and "text" in results[0], err


def test_a_batch_of_only_bad_lines_loads_no_model(tmp_path: Path, capsys) -> None:
    batch = tmp_path / "jobs.jsonl"
    batch.write_bytes(b"not json\n" + line(images=["gone.png"], question="What?") + b"\n")
    rc, out, err = run_cli(["run", "--bundle", str(tmp_path / "no-bundle"), "--batch", str(batch)], capsys)
    assert_one_line_error(rc, err, "2 of 2 questions failed")
    assert "no-bundle" not in err and len(out.splitlines()) == 2


@pytest.mark.parametrize("content, fragment", [(b"", "no questions"), (b"\n \n\r\n", "no questions"),
                                               (None, "cannot read the batch file")])
def test_an_empty_or_unreadable_batch_is_one_line(tmp_path: Path, capsys, content: bytes | None,
                                                  fragment: str) -> None:
    batch = tmp_path / "jobs.jsonl"
    if content is None:
        batch.mkdir()
    else:
        batch.write_bytes(content)
    rc, out, err = run_cli(["run", "--bundle", str(tmp_path / "no-bundle"), "--batch", str(batch)], capsys)
    assert_one_line_error(rc, err, fragment)
    assert out == ""
