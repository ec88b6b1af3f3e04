"""``qwenvl-edge batch IN OUT`` in one process (issue 27): the same answers as ``run --batch``, reruns skip the
ids in OUT, a bad row becomes an error row, duplicate ids and a foreign OUT are refused before any work, a
bundle whose file differs from its manifest is named. On the tiny trained bundle and its task images."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from qwenvl_edge.cli import main
from qwenvl_edge.evaluation import task_images
from tests.cli_helpers import assert_one_line_error, run_cli, temp_home  # noqa: F401

SAMPLING = ["--greedy", "--max-tokens", "24", "--no-cache"]
COMPARED = ("text", "boxes", "finish_reason")


def task_rows(folder: Path, n: int = 40, seed: int = 3) -> list[dict]:
    """``n`` task images (colour, sign, grounding in turn) written into ``folder``, as batch lines; every other
    row has an id, the others take their line number."""
    folder.mkdir(parents=True, exist_ok=True)
    per_task = {task: task_images.make_set(task, n // 3 + 1, seed) for task in task_images.TASKS}
    rows = []
    for k in range(n):
        sample = per_task[task_images.TASKS[k % 3]][k // 3]
        sample.image.save(folder / f"img{k:02d}.png")
        row = {"images": [f"img{k:02d}.png"], "question": sample.question}
        rows.append({"id": f"photo-{k}", **row} if k % 2 else row)
    return rows


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row_id(row: dict, n: int) -> str:
    return row.get("id", str(n))


def run_batch_answers(bundle: Path, rows: list[dict], folder: Path) -> dict[str, dict]:
    """``run --batch`` on the same rows (without their ids): the reference, by id."""
    plain = write_lines(folder / "plain.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in rows])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", "--bundle", str(bundle), *SAMPLING, "--threads", "2", "--load", "read",  # batch's load
                     "--batch", str(plain)]) == 0
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    return {row_id(r, n): a for n, (r, a) in enumerate(zip(rows, answers, strict=True), 1)}


def read_out(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [{k: v for k, v in row.items() if v is not None} for row in pq.read_table(path).to_pylist()]
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_answers(out_rows: list[dict], reference: dict[str, dict]) -> None:
    """One row per id, each with exactly the reference's text, boxes and finish reason."""
    ids = [row["id"] for row in out_rows]
    assert sorted(ids) == sorted(reference) and len(set(ids)) == len(ids)
    for row in out_rows:
        assert set(row) == {"id", *COMPARED, "timings"}, row
        want = reference[row["id"]]
        assert {k: row[k] for k in COMPARED} == {k: want[k] for k in COMPARED}, row["id"]


def batch(bundle: Path, src: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    rc, stdout, err = run_cli(["batch", str(src), str(out), "--bundle", str(bundle), *SAMPLING, *extra], capsys)
    assert stdout == ""
    return rc, err


_TASK_SETS: dict[Path, tuple[Path, dict]] = {}


def make_task_set(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The 40 task images as a batch file, and ``run --batch``'s answers to them (made once per session)."""
    if bundle not in _TASK_SETS:
        folder = tmp_path_factory.mktemp("batch-tasks")
        rows = task_rows(folder)
        _TASK_SETS[bundle] = write_lines(folder / "in.jsonl", rows), run_batch_answers(bundle, rows, folder)
    return _TASK_SETS[bundle]


@pytest.fixture(scope="module")
def task_set(trained_default_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return make_task_set(trained_default_bundle, tmp_path_factory)


def test_local_batch_gives_run_batch_answers_row_for_row(trained_default_bundle: Path, task_set, tmp_path: Path,
                                                         capsys) -> None:
    src, reference = task_set
    out = tmp_path / "out.jsonl"
    rc, err = batch(trained_default_bundle, src, out, capsys, "--batch-size", "7", "--threads-per-actor", "2")
    assert rc == 0, err
    rows = read_out(out)
    assert [row["id"] for row in rows] == list(reference)  # in this process: input order
    assert_same_answers(rows, reference)
    assert "batch: 40/40 rows (40 this run" in err and "rows/s)" in err


def test_quiet_prints_nothing(trained_default_bundle: Path, task_set, tmp_path: Path, capsys) -> None:
    src, reference = task_set
    short = write_lines(tmp_path / "in.jsonl", [json.loads(line) for line in src.read_text().splitlines()[:2]])
    (tmp_path / "img00.png").write_bytes((src.parent / "img00.png").read_bytes())
    (tmp_path / "img01.png").write_bytes((src.parent / "img01.png").read_bytes())
    rc, err = batch(trained_default_bundle, short, tmp_path / "out.jsonl", capsys, "-q")
    assert (rc, err) == (0, "")
    assert_same_answers(read_out(tmp_path / "out.jsonl"), {k: reference[k] for k in ("1", "photo-1")})


@pytest.mark.long  # three reruns of the task set; the Parquet test resumes too
@pytest.mark.parametrize("kept", [0, 3, 5])
def test_a_rerun_answers_only_the_ids_not_in_out(trained_default_bundle: Path, task_set, tmp_path: Path, capsys,
                                                 kept: int) -> None:
    src, reference = task_set
    lines = src.read_text().splitlines()[:6]
    for k in range(6):
        shutil.copy(src.parent / f"img{k:02d}.png", tmp_path)
    small = tmp_path / "in.jsonl"
    small.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert batch(trained_default_bundle, small, out, capsys, "--batch-size", "2")[0] == 0
    first = out.read_bytes().splitlines(keepends=True)
    cut = b"".join(first[:kept]) + (first[kept][:9] if kept < 6 else b"")  # a row cut short by a kill
    out.write_bytes(cut)
    rc, err = batch(trained_default_bundle, small, out, capsys, "--batch-size", "2")
    assert rc == 0, err
    after = out.read_bytes().splitlines(keepends=True)
    assert after[:kept] == first[:kept]  # byte for byte: the done rows were not answered again
    assert_same_answers(read_out(out), {row_id(json.loads(line), n): reference[row_id(json.loads(line), n)]
                                        for n, line in enumerate(lines, 1)})
    assert f"batch: {kept} of 6 rows are in {out} already" in err if kept else "already" not in err
    assert "cut short" in err  # the half row was dropped, and said so
    rc, err = batch(trained_default_bundle, small, out, capsys)  # all done: nothing to answer, no model load
    assert rc == 0 and out.read_bytes() == b"".join(after) and "6 of 6 rows" in err


def test_bad_rows_become_error_rows_and_the_rest_is_answered(trained_default_bundle: Path, task_set,
                                                             tmp_path: Path, capsys) -> None:
    src, reference = task_set
    shutil.copy(src.parent / "img00.png", tmp_path)
    shutil.copy(src.parent / "img01.png", tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)  # a corrupted image
    good = [json.loads(line) for line in src.read_text().splitlines()[:2]]
    lines = [json.dumps(good[0]), '{"question": ', json.dumps({"id": "c", "images": ["broken.png"],
                                                                "question": "What color is the shape?"}),
             json.dumps({"id": "m", "images": ["missing.png"], "question": "Hi"}),
             json.dumps({"id": [1], "question": "Hi"}), json.dumps(good[1])]
    src2 = tmp_path / "in.jsonl"
    src2.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    rc, err = batch(trained_default_bundle, src2, out, capsys, "--batch-size", "2", "-q")
    assert_one_line_error(rc, err, "4 of 6 rows failed", str(out))
    rows = {row["id"]: row for row in read_out(out)}
    assert set(rows) == {"1", "2", "c", "m", "5", "photo-1"}
    assert rows["2"]["error"].startswith(f"{src2}:2: not a JSON object")
    assert "broken.png" in rows["c"]["error"] and set(rows["c"]) == {"id", "error"}
    assert "missing.png: no such image file" in rows["m"]["error"]
    assert "id must be a string or a whole number" in rows["5"]["error"]
    assert_same_answers([rows["1"], rows["photo-1"]], {k: reference[k] for k in ("1", "photo-1")})
    rc, err = batch(trained_default_bundle, src2, out, capsys, "-q")  # a rerun still says the job is not clean
    assert_one_line_error(rc, err, "4 of 6 rows failed")


@pytest.mark.parametrize("lines, ids", [
    (['{"id": "a", "question": "Hi"}', '{"id": "a", "question": "Ho"}'], "'a'"),
    (['{"id": "2", "question": "Hi"}', '{"question": "Ho"}'], "'2'"),  # line 2's own id is 2
    (['{"id": 7, "question": "Hi"}', '{"id": "7", "question": "Ho"}'], "'7'"),
])
def test_an_id_given_twice_is_one_line_before_any_work(lines: list[str], ids: str, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    rc, err = batch(tmp_path / "no-bundle", src, out, capsys)  # no bundle: the ids are refused before it is read
    assert_one_line_error(rc, err, f"id {ids} is given twice (rows 1 and 2)")
    assert not out.exists()


@pytest.mark.parametrize("content", [b'{"answer": 1}\n', b"hello\n", b'{"id": "1", "text": "x"}\nnot json\n'])
def test_an_out_that_holds_something_else_is_refused_and_kept(content: bytes, tmp_path: Path, capsys) -> None:
    src = write_lines(tmp_path / "in.jsonl", [{"question": "Hi"}])
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    rc, err = batch(tmp_path / "no-bundle", src, out, capsys)
    assert_one_line_error(rc, err, "not a row of qwenvl-edge batch's output", "nothing was changed")
    assert out.read_bytes() == content


@pytest.mark.parametrize("args, fragment", [
    (["--actors", "2"], "--actors needs --ray"), (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--threads-per-actor", "0"], "--threads-per-actor must be at least 1"),
])
def test_bad_options_are_one_line(args: list[str], fragment: str, tmp_path: Path, capsys) -> None:
    src = write_lines(tmp_path / "in.jsonl", [{"question": "Hi"}])
    rc, err = batch(tmp_path / "no-bundle", src, tmp_path / "out.jsonl", capsys, *args)
    assert_one_line_error(rc, err, fragment)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("victim", ["vision", "llm"])
def test_a_bundle_file_that_differs_from_its_manifest_is_named(trained_default_bundle: Path, tmp_path: Path,
                                                               capsys, victim: str) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_default_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = manifest[victim]["file"] if "file" in manifest[victim] else next(
        n for n in manifest["files"] if n.endswith(".onnx" if victim == "vision" else ".gguf"))
    data = bytearray((bundle / name).read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 can tell
    (bundle / name).write_bytes(bytes(data))
    src = write_lines(tmp_path / "in.jsonl", [{"question": "Hi"}, {"question": "Ho"}])
    out = tmp_path / "out.jsonl"
    rc, err = batch(bundle, src, out, capsys, "-q")
    assert_one_line_error(rc, err, f"{bundle / name}: checksum differs from the manifest", "worker ")
    assert not out.exists() or out.read_text() == ""


def test_parquet_in_and_out_give_the_same_rows_and_resume(trained_default_bundle: Path, task_set, tmp_path: Path,
                                                          capsys) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src, reference = task_set
    rows = [json.loads(line) for line in src.read_text().splitlines()[:5]]
    table = pa.table({"id": [row_id(r, n) for n, r in enumerate(rows, 1)],
                      "images": [[str(src.parent / i) for i in r["images"]] for r in rows],
                      "question": [r["question"] for r in rows]})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    rc, err = batch(trained_default_bundle, tmp_path / "in.parquet", out, capsys, "--batch-size", "2")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["part-000001.parquet", "part-000002.parquet",
                                                     "part-000003.parquet"]
    assert_same_answers(read_out(out), {k: reference[k] for k in table.column("id").to_pylist()})
    (out / "part-000002.parquet").unlink()  # as if the job had been killed before that batch was written
    rc, err = batch(trained_default_bundle, tmp_path / "in.parquet", out, capsys, "--batch-size", "2")
    assert rc == 0 and "3 of 5 rows are in" in err
    assert_same_answers(read_out(out), {k: reference[k] for k in table.column("id").to_pylist()})
    assert (out / "part-000004.parquet").is_file()
