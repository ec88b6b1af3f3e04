"""``qwenvl-edge run`` with a real tiny bundle: the question from stdin, batches, quiet output, pipes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from tests.cli_helpers import assert_one_line_error, run_cli, run_process, temp_home  # noqa: F401

TEXT_QUESTION = "Hello! Who are you?"


def test_question_from_stdin(f32_bundle: Path, golden, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(f"{TEXT_QUESTION}\n".encode())))
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "24", "--no-cache", "-"],
                           capsys)
    assert rc == 0, err
    assert out == golden.cases["text_only"]["generated_text"] + "\n"


def test_quiet_prints_only_the_answer(f32_bundle: Path, golden, capsys) -> None:
    rc, out, err = run_cli(["run", "-q", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "24", "--no-cache",
                            TEXT_QUESTION], capsys)
    assert rc == 0 and err == ""
    assert out == golden.cases["text_only"]["generated_text"] + "\n"


def test_batch_answers_every_line_with_one_model(f32_bundle: Path, golden, tmp_path: Path, capsys) -> None:
    sign = golden.images["sign"]
    (tmp_path / "sign.png").write_bytes(sign.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = [{"images": [str(sign)], "question": "What is written on the sign?"},
             {"question": TEXT_QUESTION},
             {"images": ["broken.png"], "question": "And this?"},  # relative to the batch file's folder
             {"images": ["sign.png", "sign.png"], "question": "Compare."}]
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n\n"
                     + "\n".join(json.dumps(line) for line in lines[2:]) + "\n")
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "5", "--no-cache",
                            "--batch", str(batch)], capsys)
    assert_one_line_error(rc, err, "1 of 4 questions failed")
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 4
    assert results[0]["token_ids"] == golden.cases["one_image"]["generated_ids"][:5]
    assert results[1]["token_ids"] == golden.cases["text_only"]["generated_ids"][:5]
    assert "broken.png" in results[2]["error"]
    assert set(results[3]) >= {"text", "token_ids", "boxes", "timings"}
    assert results[3]["timings"]["images_encoded"] == 0  # the sign's rows were encoded on line 1


def test_batch_from_stdin_matches_json(f32_bundle: Path, golden, capsys, monkeypatch) -> None:
    line = json.dumps({"images": [str(golden.images["sign"])], "question": "What is written on the sign?"})
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(f"{line}\n".encode())))
    args = ["--bundle", str(f32_bundle), "--greedy", "--max-tokens", "5", "--no-cache"]
    rc, batch_out, err = run_cli(["run", *args, "--batch", "-"], capsys)
    assert rc == 0, err
    rc, json_out, err = run_cli(["run", *args, "--json", str(golden.images["sign"]), "What is written on the sign?"],
                                capsys)
    assert rc == 0, err
    drop = lambda d: {k: v for k, v in d.items() if k != "timings"}  # noqa: E731
    assert drop(json.loads(batch_out)) == drop(json.loads(json_out))


def test_piping_into_head_exits_quietly(f32_bundle: Path) -> None:
    """The reader closes the pipe after one byte: no 'Broken pipe' message, no traceback."""
    cmd = [sys.executable, "-m", "qwenvl_edge", "run", "--bundle", str(f32_bundle), "--no-cache", "--greedy",
           "--max-tokens", "1000", TEXT_QUESTION]
    producer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-c", "1"], stdin=producer.stdout, capture_output=True, timeout=120)
    producer.stdout.close()
    err = producer.stderr.read().decode()
    producer.wait(timeout=120)
    assert len(head.stdout) == 1
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err, err
    assert producer.returncode == 141


def test_verbose_shows_llama_cpp_log(f32_bundle: Path) -> None:
    args = ["run", "--bundle", str(f32_bundle), "--no-cache", "--greedy", "--max-tokens", "1", TEXT_QUESTION]
    loud = run_process([args[0], "-v", *args[1:]])
    assert loud.returncode == 0 and "llama_model_loader" in loud.stderr.decode()
    quiet = run_process(args)
    assert quiet.returncode == 0 and "llama_model_loader" not in quiet.stderr.decode()


def test_context_limit_of_the_model_does_not_blame_the_files(f32_bundle: Path, capsys) -> None:
    rc, _, err = run_cli(["run", "--bundle", str(f32_bundle), "--n-ctx", "65536", TEXT_QUESTION], capsys)
    assert_one_line_error(rc, err, "n_ctx 65536", "seq_length")
    assert "llm.gguf" not in err and "cannot load" not in err
