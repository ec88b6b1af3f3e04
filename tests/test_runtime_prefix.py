"""Prefix reuse across processes: a KV prefix state stored by one process is restored by the next.

Each "process" is a real one (``python -c``), started with the same store folder (``cache_dir``):
the second reports no image encoded and at least one image's positions reused, and answers the
golden ids; a corrupted prefix-state entry is dropped (never trusted) and the answer stays golden.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwenvl_edge import contract
from qwenvl_edge.runtime.store import SUFFIX

REPO = Path(__file__).resolve().parents[1]
ASK = """
import json, sys
from qwenvl_edge.runtime.pipeline import QwenVL
bundle, cache, image, question, n = sys.argv[1:6]
with QwenVL(bundle, n_threads=2, cache_dir=cache) as m:
    r = m.generate([image], question, max_tokens=int(n), temperature=0)
    print(json.dumps({"ids": r.token_ids, **r.timings.to_dict(), "dropped": m.store.dropped}))
"""


def ask(bundle: Path, cache: Path, image: Path, question: str, n: int, tmp_path: Path) -> dict:
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", ASK, str(bundle), str(cache), str(image), question, str(n)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_restores_the_image_prefix(f32_bundle: Path, golden, tmp_path: Path) -> None:
    case = golden.cases["one_image"]
    image, cache, n = golden.images["sign"], tmp_path / "store", golden.max_new_tokens
    first = ask(f32_bundle, cache, image, case["text"], n, tmp_path)
    assert first["images_encoded"] == 1 and first["restored_positions"] == 0
    assert first["ids"] == case["generated_ids"]
    second = ask(f32_bundle, cache, image, "Another question about it?", 4, tmp_path)
    assert second["images_encoded"] == 0 and second["images_from_cache"] == 0  # rows not even read
    assert second["reused_positions"] >= contract.POSITIONS_PER_IMAGE
    assert second["restored_positions"] == second["reused_positions"]
    third = ask(f32_bundle, cache, image, case["text"], n, tmp_path)
    assert third["ids"] == case["generated_ids"]  # restored state, golden answer
    assert third["restored_positions"] >= contract.POSITIONS_PER_IMAGE


def test_a_corrupted_prefix_state_is_dropped_and_the_answer_stays_golden(f32_bundle: Path, golden,
                                                                         tmp_path: Path) -> None:
    case = golden.cases["one_image"]
    image, cache, n = golden.images["sign"], tmp_path / "store", golden.max_new_tokens
    ask(f32_bundle, cache, image, case["text"], n, tmp_path)
    [state] = (cache / "prefix").rglob(f"*{SUFFIX}")
    blob = bytearray(state.read_bytes())
    blob[len(blob) // 2] ^= 0x40  # one flipped bit in the KV values
    state.write_bytes(bytes(blob))
    again = ask(f32_bundle, cache, image, case["text"], n, tmp_path)
    assert again["dropped"] == 1 and again["restored_positions"] == 0
    assert again["ids"] == case["generated_ids"]
    assert again["images_from_cache"] == 1  # the rows entry was fine: only the state was recomputed
    [rewritten] = (cache / "prefix").rglob(f"*{SUFFIX}")
    assert rewritten.read_bytes() != bytes(blob)  # recomputed and rewritten


def _nan_entry(path: Path) -> None:
    from qwenvl_edge.runtime.store import encode_entry

    rows = np.full((contract.N_QUERIES, 256), np.nan, np.float32)
    path.write_bytes(encode_entry("rows", path.stem, rows))


def _folder(path: Path) -> None:
    path.unlink()
    (path / "inside").mkdir(parents=True)


@pytest.mark.parametrize("damage", [lambda p: p.write_bytes(b""), lambda p: p.write_bytes(p.read_bytes()[:-7]),
                                    _nan_entry, _folder], ids=["zero-bytes", "truncated", "nan", "folder"])
def test_a_bad_rows_entry_is_encoded_again(f32_bundle: Path, golden, tmp_path: Path, damage) -> None:
    from qwenvl_edge.runtime.pipeline import QwenVL

    with QwenVL(f32_bundle, n_threads=2, cache_dir=tmp_path) as m:
        m.encode_image(golden.images["sign"])
        [entry] = (tmp_path / "rows").rglob(f"*{SUFFIX}")
        damage(entry)
    with QwenVL(f32_bundle, n_threads=2, cache_dir=tmp_path) as m:
        rows = m.encode_image(golden.images["sign"])
        assert m.session.encoder.is_open and m.store.dropped == 1  # encoded again, not trusted
    np.testing.assert_allclose(rows, golden.vision("sign"), atol=1e-4)
    assert entry.is_file() and sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
