"""The tiny trained Qwen-VL (issue 15): its task images, its shipped weights, and what its bundles answer.

Accuracy is measured on 40 images per task from seed 1, which the training never saw (it
drew from seed 20261201 and stopped early on seed 3). The float bundle must clear the
issue's floors; the default INT8 + Q4_K_M bundle may get at most 2 answers fewer right per
task: that is the quantized bundle's test of record, on a model whose answers mean something.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge.cli import main
from qwenvl_edge.evaluation import task_images as T
from qwenvl_edge.evaluation.evaluate import evaluate, synthetic_items
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.tiny_trained import DATA, frozen_rows, load_shipped

TEST_SEED = 1
N_PER_TASK = 40
FLOORS = {"colour": 0.97, "sign": 0.90, "grounding": 0.80}
# Tasks whose floor the shipped weights do not meet yet (see training/train.log and the README): the
# test is a strict xfail, so it fails the moment retrained weights meet the floor and this set must shrink.
NOT_YET: set[str] = set()


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="session")
def report(trained_default_bundle: Path, trained_f32_bundle: Path) -> dict:
    return evaluate(trained_default_bundle, synthetic_items(N_PER_TASK, TEST_SEED), trained_f32_bundle, n_threads=1)


# --- the task generator -------------------------------------------------------------------------

def test_task_images_are_a_function_of_the_seed() -> None:
    for task in T.TASKS:
        a, b, c = T.make_set(task, 3, 5), T.make_set(task, 3, 5), T.make_set(task, 3, 6)
        assert [s.answer for s in a] == [s.answer for s in b]
        assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
        assert not all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c, strict=True))


def test_task_images_follow_the_issue() -> None:
    for s in T.make_set("colour", 30, 9):
        assert s.image.size == (448, 448) and s.question == "What color is the shape?" and s.answer in T.COLOURS
        pixels = np.asarray(s.image).reshape(-1, 3)
        ink = pixels[(pixels != 255).any(axis=1)]
        assert np.abs(ink.astype(int) - T.COLOURS[s.answer]).max() <= 12 + 1  # +1: antialiased triangle edges
    for s in T.make_set("sign", 30, 9):
        assert s.question == "What is written on the sign?" and s.answer in T.WORDS
    for s in T.make_set("grounding", 30, 9):
        colour, shape = s.question.removeprefix("Where is the ").removesuffix("?").split()
        assert colour in T.COLOURS and shape in T.SHAPES
        x1, y1, x2, y2 = s.box
        assert 80 <= x2 - x1 <= 220 and x1 >= 0 and x2 <= 448 and y1 >= 0 and y2 <= 448
        assert s.answer == f"<ref>the {colour} {shape}</ref><box>({round(x1 / 448 * 1000)},{round(y1 / 448 * 1000)}),"\
                           f"({round(x2 / 448 * 1000)},{round(y2 / 448 * 1000)})</box>"
        assert np.abs(np.asarray(s.image.getpixel(((x1 + x2) // 2, y2 - 2))) - T.COLOURS[colour]).max() <= 12


def test_answers_are_scored_as_the_issue_says() -> None:
    s = T.make_set("grounding", 1, 9)[0]
    assert T.answer_correct(s, s.answer)
    x1, y1, x2, y2 = T.to_frame(s.box)
    shifted = f"<ref>x</ref><box>({x1 + (x2 - x1) // 2},{y1}),({x2 + (x2 - x1) // 2},{y2})</box>"
    assert not T.answer_correct(s, shifted)  # IoU 1/3
    assert not T.answer_correct(s, "somewhere")
    c = T.make_set("colour", 1, 9)[0]
    assert T.answer_correct(c, c.answer) and not T.answer_correct(c, c.answer + " circle")


# --- the shipped weights ------------------------------------------------------------------------

def test_shipped_weights_are_small_and_rebuild_a_real_checkpoint(trained_ckpt: Path) -> None:
    assert DATA.stat().st_size <= 10 * 2**20
    meta, arrays = load_shipped()
    reader = CheckpointReader(trained_ckpt)
    cfg = reader.config
    assert cfg.hidden_size % 256 == 0 and cfg.n_ff % 256 == 0  # K-quants apply to every decoder matrix
    assert cfg.visual.image_size == 448 and cfg.visual.n_queries == 256 and cfg.vocab_size == 151936
    table = reader.tensor("lm_head.weight")
    frozen = frozen_rows("lm_head.weight", table.shape, meta["seed"])
    untouched = np.setdiff1d(np.arange(cfg.vocab_size), meta["trained_ids"])
    assert np.allclose(table[untouched[:1000]], frozen[untouched[:1000]], atol=1e-3)  # bf16 rounding
    assert not np.allclose(table[meta["trained_ids"]], frozen[meta["trained_ids"]], atol=1e-2)


# --- what the bundles answer ------------------------------------------------------------------

@pytest.mark.long  # an accuracy sample: 120 task images through two bundles (about 3 min on 2 cores)
@pytest.mark.parametrize("task", list(FLOORS))
def test_float_bundle_meets_the_floor(report: dict, task: str, request: pytest.FixtureRequest) -> None:
    if task in NOT_YET:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"the shipped weights miss the {task} floor"))
    ref = report["tasks"][task]["reference"]
    assert ref["n"] == N_PER_TASK
    assert ref["accuracy"] >= FLOORS[task], (task, ref, report["examples"])


@pytest.mark.long  # an accuracy sample: 120 task images through two bundles (about 3 min on 2 cores)
def test_quantized_bundle_loses_at_most_two_answers_per_task(report: dict, capsys) -> None:
    with capsys.disabled():
        print("\ntiny trained, INT8 + Q4_K_M vs FP32 + F32 on 40 images per task:",
              ", ".join(f"{t} {s['bundle']['right']} vs {s['reference']['right']}" for t, s in report["tasks"].items()))
    for task in FLOORS:
        scores = report["tasks"][task]
        assert scores["bundle"]["right"] >= scores["reference"]["right"] - 2, (task, scores)


@pytest.mark.long  # an accuracy sample: 120 task images through two bundles (about 3 min on 2 cores)
def test_report_measures_each_stage(report: dict) -> None:
    v, d = report["vision"], report["decoder"]
    assert v["rows"] == 3 * N_PER_TASK * 256 and 0.9 < v["cosine_mean"] <= 1.0 and v["rel_error_mean"] > 0
    assert d["positions"] > 3 * N_PER_TASK and 0.5 < d["top1_agreement"] <= 1.0 and 0 < d["kl_mean"] < 1.0


# --- the commands -------------------------------------------------------------------------------

def test_eval_command_prints_text_and_json(trained_default_bundle: Path, trained_f32_bundle: Path,
                                           capsys) -> None:
    assert main(["eval", str(trained_default_bundle), "--reference", str(trained_f32_bundle), "--n", "2",
                 "--seed", "11", "--threads", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["tasks"]) == set(T.TASKS) and data["items"] == 6
    assert set(data["decoder"]) >= {"top1_agreement", "kl_mean", "kl_max"}
    assert main(["eval", str(trained_default_bundle), "--n", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "task sign: bundle" in out and "vision rows" not in out  # no reference: accuracy only


def test_eval_reads_a_folder_with_questions(trained_f32_bundle: Path, tmp_path: Path, capsys) -> None:
    samples = T.make_set("sign", 2, 12)
    entries = []
    for i, s in enumerate(samples):
        s.image.save(tmp_path / f"{i}.png")
        entries.append({"image": f"{i}.png", "question": s.question, "answer": s.answer, "task": "sign"})
    (tmp_path / "questions.json").write_text(json.dumps(entries))
    assert main(["eval", str(trained_f32_bundle), "--images", str(tmp_path), "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["sign"]["bundle"]["n"] == 2


@pytest.mark.parametrize("args, message", [
    (["--images", "/nonexistent/folder"], "not a folder of images"),
    (["--n", "0"], "--n must be at least 1"),
])
def test_eval_bad_input_is_one_line(trained_f32_bundle: Path, args: list[str], message: str, capsys) -> None:
    assert main(["eval", str(trained_f32_bundle), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwenvl-edge: error:") and message in err and err.count("\n") == 1


def test_demo_answers_its_three_tasks(tmp_path: Path, capsys) -> None:
    demo = tmp_path / "demo"
    assert main(["demo", "--dir", str(demo), "--no-cache", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("  A: ") == 3 and re.search(r"demo: [0-3]/3 right", captured.err), captured
    right = {task for task in ("sign", "colour", "grounding") if f"demo-{task}.png\n" in captured.out
             and "(right)" in captured.out.split(f"demo-{task}.png\n")[1].split("\n", 2)[1]}
    assert right >= set(FLOORS) - NOT_YET  # a task the model has learned is answered right in the demo
    for name in ("demo-sign.png", "demo-colour.png", "demo-grounding.png", "demo-grounding-box.png"):
        assert (demo / name).is_file()
    assert not (tmp_path / "home").exists()  # --dir is respected (the export may keep its stage cache in XDG)
