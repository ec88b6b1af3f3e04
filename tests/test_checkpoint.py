"""Checkpoint reading: every layout round-trips, the golden recipe is reproduced, bad folders get one line."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge.cli import main
from qwenvl_edge.errors import CheckpointError
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.safetensors_io import write_safetensors
from qwenvl_edge.export.synthetic_checkpoint import make_tensor, write_checkpoint
from qwenvl_edge.export.tensor_record import bf16_bits_to_f32, f32_to_bf16_bits
from tests.conftest import GOLDEN_DIR


def golden_sha256() -> dict[str, str]:
    lines = (GOLDEN_DIR / "tensors.sha256").read_text().split("\n")
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def assert_matches_golden_checksums(folder: Path) -> None:
    """Catches any drift from the golden recipe or a reader that garbles bytes."""
    reader = CheckpointReader(folder)
    expected = golden_sha256()
    assert set(expected) == set(reader.names())
    wrong = [n for n, h in expected.items() if hashlib.sha256(reader.record(n).bf16_bits().tobytes()).hexdigest() != h]
    assert wrong == []


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_golden_checksums_safetensors(tiny_ckpt: Path) -> None:
    assert_matches_golden_checksums(tiny_ckpt)


def test_golden_checksums_bin_shards(tiny_ckpt_bin: Path) -> None:
    assert len(list(tiny_ckpt_bin.glob("pytorch_model-*-of-*.bin"))) >= 3
    assert (tiny_ckpt_bin / "pytorch_model.bin.index.json").is_file()
    assert_matches_golden_checksums(tiny_ckpt_bin)


@pytest.mark.parametrize("fmt,single", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_unsharded_layouts_round_trip(tmp_path: Path, fmt: str, single: str) -> None:
    overrides = {"hidden_size": 128, "num_attention_heads": 1, "intermediate_size": 256, "vocab_size": 1024,
                 "num_hidden_layers": 1, "visual": {"width": 32, "layers": 1, "heads": 2}}
    out = write_checkpoint(tmp_path / fmt, "tiny", seed=3, fmt=fmt, shard_bytes=None, overrides=overrides)
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors")) == [single]
    reader = CheckpointReader(out)
    assert reader.config.hidden_size == 128 and reader.config.visual.width == 32
    for name, shape in reader.config.tensor_shapes().items():
        expected = bf16_bits_to_f32(f32_to_bf16_bits(make_tensor(name, shape, 3)))
        np.testing.assert_array_equal(reader.tensor(name), expected, err_msg=name)


def test_f16_and_f32_tensors_read_as_float32(tmp_path: Path) -> None:
    values = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    for dtype, stored in [("F16", values.astype(np.float16)), ("F32", values)]:
        path = tmp_path / f"{dtype}.safetensors"
        write_safetensors(path, {"t": (4, 6)}, lambda _n, s=stored: s, dtype=dtype)
        from qwenvl_edge.export.safetensors_io import read_safetensors

        np.testing.assert_array_equal(read_safetensors(path)["t"].f32(), stored.astype(np.float32))


def test_bf16_rounding_is_nearest_even() -> None:
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38], dtype=np.float32)  # ties and a large value
    assert f32_to_bf16_bits(x).tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x7F62]


# --- bad input: each one line, naming the file -------------------------------------------------

def one_line_error(folder: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        CheckpointReader(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_not_a_qwen_vl_folder(tmp_path: Path) -> None:
    one_line_error(tmp_path, "no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    one_line_error(tmp_path, "not a Qwen-VL config")
    one_line_error(tmp_path / "nope", "not a folder")


def test_missing_shard(tmp_path: Path, tiny_ckpt_bin: Path) -> None:
    folder = copy_ckpt(tiny_ckpt_bin, tmp_path / "c")
    victim = sorted(folder.glob("pytorch_model-*.bin"))[1]
    victim.unlink()
    assert victim.name in one_line_error(folder, "missing shard")


def test_wrong_shape_tensor(tmp_path: Path, tiny_ckpt: Path) -> None:
    folder = copy_ckpt(tiny_ckpt, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 1000  # shards still hold 512-wide MLP branches
    (folder / "config.json").write_text(json.dumps(config))
    message = one_line_error(folder, r"transformer.h.0.mlp.w1.weight has shape \[512, 256\]")
    assert "model-00001-of-00001.safetensors" in message


@pytest.mark.parametrize("which", ["safetensors", "bin"])
def test_truncated_file(tmp_path: Path, which: str, tiny_ckpt: Path, tiny_ckpt_bin: Path) -> None:
    folder = copy_ckpt(tiny_ckpt if which == "safetensors" else tiny_ckpt_bin, tmp_path / "c")
    victim = sorted(folder.glob(f"*.{which}"))[-1]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    assert victim.name in one_line_error(folder, "truncated")


def test_pickle_that_asks_for_code_is_refused(tmp_path: Path, tiny_ckpt_bin: Path) -> None:
    folder = copy_ckpt(tiny_ckpt_bin, tmp_path / "c")
    victim = sorted(folder.glob("pytorch_model-*.bin"))[0]
    evil = pickle.PROTO + b"\x02" + pickle.GLOBAL + b"os\nsystem\n" + pickle.BINUNICODE
    evil += len(b"touch pwned").to_bytes(4, "little") + b"touch pwned" + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    prefix = victim.stem
    victim.unlink()
    with zipfile.ZipFile(victim, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", evil)
    message = one_line_error(folder, "refused: the pickle asks for os.system")
    assert victim.name in message
    assert not Path("pwned").exists()


def test_missing_layer_names_the_tensor(tmp_path: Path) -> None:
    overrides = {"hidden_size": 128, "num_attention_heads": 1, "intermediate_size": 256, "vocab_size": 512,
                 "num_hidden_layers": 2, "visual": {"width": 32, "layers": 1, "heads": 2}}
    folder = write_checkpoint(tmp_path / "c", "tiny", fmt="safetensors", shard_bytes=None, overrides=overrides)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(folder, "tensor transformer.h.2.ln_1.weight is missing")


# --- the synth command --------------------------------------------------------------------------

def test_synth_cli_writes_a_readable_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    override = '{"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256, "vocab_size": 4096,' \
               ' "num_hidden_layers": 1, "visual": {"width": 48, "layers": 1, "heads": 3}}'
    rc = main(["synth", str(tmp_path / "s"), "--format", "bin", "--shard-mb", "1", "--seed", "5",
               "--override", override])
    assert rc == 0
    reader = CheckpointReader(tmp_path / "s")
    assert len(reader.files) > 1 and reader.config.visual.heads == 3
    assert (tmp_path / "s" / "qwen.tiktoken").stat().st_size == 2561218


def test_cli_error_is_one_line_and_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["synth", str(tmp_path / "s"), "--override", '{"hidden_size": 100, "num_attention_heads": 3}'])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("qwenvl-edge: error: ") and err.count("\n") == 1


def test_reads_a_file_written_by_torch() -> None:
    """A file torch.save wrote (torch 2.13, committed with its values): views, offsets and dtypes."""
    from qwenvl_edge.export.torch_zip_io import read_torch_zip

    data = Path(__file__).parent / "data"
    records = read_torch_zip(data / "torch_written.bin")
    with np.load(data / "torch_written_expected.npz") as expected:
        assert set(records) == set(expected.files)
        for name, record in records.items():
            np.testing.assert_array_equal(record.f32(), expected[name], err_msg=name)
    assert records["transposed_f32"].stride == (1, 4) and records["offset_view"].storage_offset == 3
