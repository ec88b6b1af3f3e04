"""Runtime behaviour beyond the golden numbers: chat KV reuse, image cache, boxes, CLI, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl_edge.cli import main
from qwenvl_edge.errors import BundleError, ImageError, PromptError
from qwenvl_edge.runtime.boxes import parse_boxes
from qwenvl_edge.runtime.pipeline import QwenVL
from qwenvl_edge.runtime.prompt import n_positions


@pytest.fixture(scope="module")
def model(f32_bundle: Path):
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        yield m


# --- KV cache and image reuse -------------------------------------------------------------------

def test_second_chat_turn_prefills_only_new_tokens(f32_bundle: Path, golden) -> None:
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        first = m.chat("What is written on the sign?", [golden.images["sign"]], max_tokens=6, temperature=0.0)
        in_context = m.session.decoder().n_past
        evaluated_before = m.session.decoder().n_evaluated
        second = m.chat("And what colour is it?", max_tokens=4, temperature=0.0)
        units = m.build_prompt([], "And what colour is it?", m.history[:-1])
        # everything of turn one stays: only what follows the first answer is evaluated again
        assert second.timings.reused_positions >= in_context - 1
        assert second.timings.images_encoded == 0 and second.timings.images_from_cache == 0
        new_positions = n_positions(units) - second.timings.reused_positions
        assert second.timings.prefill_positions == new_positions
        assert m.session.decoder().n_evaluated - evaluated_before == new_positions + second.timings.decode_tokens - 1
        assert first.timings.images_encoded == 1


def test_same_placeholders_different_image_is_not_reused(model: QwenVL, golden) -> None:
    """Two photos behind identical placeholder ids must not share KV: reuse stops before the rows."""
    question = "What is written on the sign?"
    a = model.next_token_logits([golden.images["sign"]], question)
    b = model.next_token_logits([golden.images["noise"]], question)
    start = golden.cases["one_image"]["image_spans"][0][0]
    assert not np.allclose(a, b)
    again = model.generate([golden.images["noise"]], question, max_tokens=1, temperature=0.0)
    assert again.timings.reused_positions > start  # the same image now: rows are re-used
    model.generate([golden.images["sign"]], question, max_tokens=1, temperature=0.0)
    assert model.last_result.timings.reused_positions == start


def test_image_rows_cache_skips_the_encoder(f32_bundle: Path, golden, tmp_path: Path) -> None:
    with QwenVL(f32_bundle, n_threads=2, cache_dir=tmp_path) as m:
        rows = m.encode_image(golden.images["sign"])
        assert rows.shape == (256, 256)
        np.testing.assert_allclose(rows, golden.vision("sign"), atol=1e-4)
    with QwenVL(f32_bundle, n_threads=2, cache_dir=tmp_path) as m:  # a new process would see the same files
        result = m.generate([golden.images["sign"]], "What is written on the sign?", max_tokens=2,
                            temperature=0.0)
        assert result.timings.images_from_cache == 1 and result.timings.images_encoded == 0
        assert not m.session.encoder.is_open  # the ONNX session was never opened


# --- boxes --------------------------------------------------------------------------------------

def test_box_parses_to_pixels() -> None:
    [box] = parse_boxes("<ref>x</ref><box>(100,200),(300,400)</box>", 640, 427)
    assert box.label == "x" and box.norm == (100, 200, 300, 400)
    assert box.pixels == pytest.approx((64.0, 85.4, 192.0, 170.8))


def test_several_boxes_share_the_last_label() -> None:
    text = "<ref>cats</ref><box>(0,0),(10,10)</box><box>(20,20),(1000,1000)</box> <box>(1,2),(3,4)"
    boxes = parse_boxes(text, 100, 100)
    assert [b.label for b in boxes] == ["cats", "cats"] and boxes[1].pixels == (2.0, 2.0, 100.0, 100.0)


def test_draw_writes_the_box(tmp_path: Path) -> None:
    from qwenvl_edge.runtime.boxes import draw_boxes

    image = Image.new("RGB", (640, 427), "white")
    out = draw_boxes(image, parse_boxes("<ref>x</ref><box>(100,200),(300,400)</box>", 640, 427), tmp_path / "b.png")
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert (drawn[128, 64] != 255).any() and (drawn[128, 191] != 255).any()  # left and right edges
    assert (drawn[170, 128] != 255).any()  # bottom edge
    assert (drawn[128, 128] == 255).all() and (drawn[300, 400] == 255).all()  # inside and outside untouched


# --- CLI ----------------------------------------------------------------------------------------

def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_run_json(f32_bundle: Path, golden, capsys) -> None:
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "5", "--no-cache",
                            "--json", str(golden.images["sign"]), "What is written on the sign?"], capsys)
    assert rc == 0, err
    data = json.loads(out)
    assert set(data) >= {"text", "token_ids", "boxes", "timings"}
    assert data["token_ids"] == golden.cases["one_image"]["generated_ids"][:5]


def test_cli_run_streams_text_only(f32_bundle: Path, golden, capsys) -> None:
    rc, out, err = run_cli(["run", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "24", "--no-cache",
                            "Hello! Who are you?"], capsys)
    assert rc == 0, err
    assert out == golden.cases["text_only"]["generated_text"] + "\n"
    assert "tok/s" in err


def test_cli_draw(f32_bundle: Path, golden, capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(["run", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "3", "--no-cache",
                          "--draw", str(tmp_path / "d.png"), str(golden.images["sign"]), "Find <ref>it</ref>"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "d.png").size == Image.open(golden.images["sign"]).size


# --- bad input: one line, non-zero exit ---------------------------------------------------------

def assert_one_line_error(rc: int, err: str, fragment: str) -> None:
    assert rc == 2
    assert err.startswith("qwenvl-edge: error: ") and err.count("\n") == 1, err
    assert fragment in err


def test_missing_bundle(tmp_path: Path, capsys) -> None:
    rc, _, err = run_cli(["run", "--bundle", str(tmp_path / "none"), "hi"], capsys)
    assert_one_line_error(rc, err, "not a qwenvl-edge bundle")


def test_truncated_bundle_file(f32_bundle: Path, tmp_path: Path, capsys) -> None:
    broken = shutil.copytree(f32_bundle, tmp_path / "b")
    with open(broken / "llm.gguf", "r+b") as f:
        f.truncate(1000)
    rc, _, err = run_cli(["run", "--bundle", str(broken), "hi"], capsys)
    assert_one_line_error(rc, err, "llm.gguf")


def test_parts_from_two_checkpoints(f32_bundle: Path, narrow_bundle: Path, tmp_path: Path, golden) -> None:
    mixed = shutil.copytree(f32_bundle, tmp_path / "mixed")
    shutil.copy(narrow_bundle / "vision.onnx", mixed / "vision.onnx")
    manifest = json.loads((mixed / "manifest.json").read_text())
    manifest["files"]["vision.onnx"] = json.loads((narrow_bundle / "manifest.json").read_text())["files"]["vision.onnx"]
    (mixed / "manifest.json").write_text(json.dumps(manifest))
    with QwenVL(mixed, n_threads=2, cache_dir=None) as m, pytest.raises(BundleError, match="different checkpoints"):
        m.encode_image(golden.images["sign"])
    with pytest.raises(BundleError, match="different exports"):
        shutil.copy(narrow_bundle / "llm.gguf", mixed / "llm.gguf")
        manifest["files"]["llm.gguf"] = json.loads((narrow_bundle / "manifest.json").read_text())["files"]["llm.gguf"]
        (mixed / "manifest.json").write_text(json.dumps(manifest))
        QwenVL(mixed, n_threads=2, cache_dir=None).generate([], "hi", max_tokens=1)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"])
def test_unreadable_image(f32_bundle: Path, tmp_path: Path, capsys, content: bytes) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    rc, _, err = run_cli(["run", "--bundle", str(f32_bundle), "--no-cache", str(bad), "what?"], capsys)
    assert_one_line_error(rc, err, "bad.png")


def test_unreadable_image_api(model: QwenVL, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageError):
        model.generate([bad], "what?", max_tokens=1)


def test_empty_question(f32_bundle: Path, golden, capsys) -> None:
    rc, _, err = run_cli(["run", "--bundle", str(f32_bundle), str(golden.images["sign"]), "  "], capsys)
    assert_one_line_error(rc, err, "empty")


def test_too_many_images_for_the_context(f32_bundle: Path, golden, capsys) -> None:
    images = [str(golden.images["sign"])] * 3
    rc, _, err = run_cli(["run", "--bundle", str(f32_bundle), "--n-ctx", "512", "--no-cache", *images, "compare"],
                         capsys)
    assert_one_line_error(rc, err, "context")
    with QwenVL(f32_bundle, n_threads=2, n_ctx=512, cache_dir=None) as m, pytest.raises(PromptError):
        m.generate([golden.images["sign"]] * 2, "compare")


# --- chat, context budget, demo -----------------------------------------------------------------

def test_chat_command_keeps_the_conversation(f32_bundle: Path, golden, capsys, monkeypatch) -> None:
    import io

    lines = "What is written on the sign?\n/reset\n\nAnd now?\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    rc, out, err = run_cli(["chat", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "4", "--no-cache",
                            str(golden.images["sign"])], capsys)
    assert rc == 0, err
    assert out.count("\n") == 2 and "[conversation forgotten]" in err
    first_answer = out.splitlines()[0]
    expected = golden.cases["one_image"]["generated_text"]
    assert expected.startswith(first_answer) and first_answer


def test_old_turns_are_dropped_to_fit(f32_bundle: Path, golden) -> None:
    from qwenvl_edge.runtime.prompt import ImageRef, Turn

    with QwenVL(f32_bundle, n_threads=2, n_ctx=768, cache_dir=None) as m:
        old = Turn("What is written on the sign?", (ImageRef("a"),), "a sign")
        newer = Turn("And this one?", (ImageRef("b"),), "noise")
        units = m.build_prompt([golden.images["sign"]], "Compare.", [old, newer])
        keys = [u.key for u in units if isinstance(u, ImageRef)]
        assert len(keys) == 2 and keys[0] == "b"  # the oldest turn went first, the newest stayed
        assert n_positions(units) <= 768
