"""The checked store: bad entries are dropped and recomputed, never trusted; bounded; no temp files left."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from qwenvl_edge.runtime.store import MAGIC, BadEntry, Expect, Store, decode_entry, encode_entry, entry_key

ROWS = Expect("float32", (4, 3), finite=True)
KEY = entry_key("test", "rows")


def rows() -> np.ndarray:
    return np.arange(12, dtype=np.float32).reshape(4, 3) / 7


def rewrite(path: Path, header_change: dict | None = None, payload: bytes | None = None) -> None:
    blob = path.read_bytes()
    end = blob.index(b"\n", len(MAGIC))
    header = json.loads(blob[len(MAGIC):end])
    header.update(header_change or {})
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + (blob[end + 1:] if payload is None else payload))


def test_round_trip_and_miss(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.get("rows", KEY, ROWS) is None
    store.put("rows", KEY, rows())
    np.testing.assert_array_equal(store.get("rows", KEY, ROWS), rows())
    assert store.size() == (1, store.path("rows", KEY).stat().st_size)


def wrong_shape(path: Path) -> None:
    array = np.zeros((2, 6), np.float32)
    path.write_bytes(encode_entry("rows", KEY, array))


def nan_rows(path: Path) -> None:
    bad = rows()
    bad[1, 1] = np.nan
    path.write_bytes(encode_entry("rows", KEY, bad))


def flipped_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x10
    path.write_bytes(bytes(blob))


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def a_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")


def lying_header(path: Path) -> None:
    rewrite(path, {"shape": [3, 4]})


def other_key(path: Path) -> None:
    rewrite(path, {"key": entry_key("another")})


@pytest.mark.parametrize("damage", [wrong_shape, nan_rows, flipped_byte, zero_bytes, a_folder, lying_header,
                                    other_key])
def test_bad_entry_is_dropped_then_rewritten(tmp_path: Path, damage) -> None:
    store = Store(tmp_path)
    store.put("rows", KEY, rows())
    path = store.path("rows", KEY)
    damage(path)
    assert store.get("rows", KEY, ROWS) is None  # never trusted
    assert not os.path.lexists(path) and store.dropped == 1
    store.put("rows", KEY, rows())  # the caller recomputes and rewrites
    np.testing.assert_array_equal(store.get("rows", KEY, ROWS), rows())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


def test_a_folder_at_the_entry_path_leaks_no_temp_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    path = store.path("rows", KEY)
    for _ in range(3):  # three runs, each finding a folder there
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True)
        assert store.get("rows", KEY, ROWS) is None
        store.put("rows", KEY, rows())
        np.testing.assert_array_equal(store.get("rows", KEY, ROWS), rows())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name] and path.is_file()


def test_unwritable_store_answers_anyway(tmp_path: Path) -> None:
    (tmp_path / "rows").write_text("a file where the folder should be")
    store = Store(tmp_path)
    store.put("rows", KEY, rows())  # logged, not raised
    assert store.get("rows", KEY, ROWS) is None


def test_least_recently_used_entries_are_evicted(tmp_path: Path) -> None:
    size = len(encode_entry("rows", KEY, rows()))
    store = Store(tmp_path, max_bytes=3 * size)
    keys = [entry_key(str(i)) for i in range(5)]
    for i, key in enumerate(keys):
        store.put("rows", key, rows())
        os.utime(store.path("rows", key), (1000 + i, 1000 + i))
        if i == 2:
            store.get("rows", keys[0], ROWS)  # used: it moves to the end
            os.utime(store.path("rows", keys[0]), (2000, 2000))
    kept = [k for k in keys if store.has("rows", k)]
    assert kept == [keys[0], keys[3], keys[4]]
    assert store.size()[1] <= 3 * size
    assert store.clear() == 3 and store.size() == (0, 0)


def test_store_paths_refuse_odd_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Store(tmp_path).path("rows", "../../etc/passwd")


HEADER_VALUES = st.one_of(st.none(), st.integers(-5, 50), st.text(max_size=5),
                          st.lists(st.integers(-2, 13), max_size=3))
MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.integers(0, 1 << 16),
                               st.binary(min_size=1, max_size=8)), max_size=4)
HEADERS = st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["kind", "key", "dtype", "shape", "nbytes", "sha256"]), HEADER_VALUES, max_size=3))


@seed(20261201)
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(header=HEADERS, mutations=MUTATIONS)
def test_entry_loader_fuzz(header: dict | None, mutations: list) -> None:
    """Mutated entries give the array back unchanged or ``BadEntry``; never another exception."""
    blob = bytearray(encode_entry("rows", KEY, rows()))
    if header is not None:  # a header with some fields replaced
        end = blob.index(b"\n", len(MAGIC))
        fields = {**json.loads(blob[len(MAGIC):end]), **header}
        blob = bytearray(MAGIC + json.dumps(fields).encode() + b"\n" + bytes(blob[end + 1:]))
    for op, at, data in mutations:
        i = at % (len(blob) + 1)
        if op == "flip" and i < len(blob):
            blob[i] ^= data[0] or 1
        elif op == "cut":
            del blob[i:]
        elif op == "insert":
            blob[i:i] = data
    try:
        array = decode_entry(bytes(blob), "rows", KEY, ROWS)
    except BadEntry:
        return
    np.testing.assert_array_equal(array, rows())
