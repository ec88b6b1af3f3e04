"""What the export reads back from disk is data, never trusted as paths: the resume record (stages.json)
and an old bundle's manifest. A record that fails its checks is treated as absent (the stage is redone,
never a traceback); nothing outside the tool's own folders is deleted; ``--force`` replaces only a
bundle whose every file matches its manifest's size and sha256."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from qwenvl_edge.bundler.bundle_export import ExportOptions, _job_options
from qwenvl_edge.bundler.export_stages import RECORDS, StageCache, export_cache_root, job_fingerprint
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.runtime.bundle import Bundle, file_entry
from tests.test_bundle_export import assert_one_line_error, run_cli

STAGE_OUTPUT = b"stage output"


def make_stage(folder: Path) -> dict:
    (folder / "out.bin").write_bytes(STAGE_OUTPUT)
    return {"made": True}


@pytest.fixture()
def victim(tmp_path: Path) -> Path:
    """A user's file beside (above) the resume folder."""
    path = tmp_path / "victim.txt"
    path.write_text("my thesis")
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "xdg" / "qwenvl-edge" / "export" / "job"
    path.mkdir(parents=True)
    return path


def write_records(folder: Path, records) -> None:
    text = records if isinstance(records, (str, bytes)) else json.dumps(records)
    (folder / RECORDS).write_bytes(text.encode() if isinstance(text, str) else text)


def record(files: dict, **extra) -> dict:
    return {"files": files, "report": {}, "seconds": 1.0, **extra}


def assert_redone(folder: Path, messages: list[str] | None = None) -> None:
    cache = StageCache(folder, progress=(messages.append if messages is not None else None))
    try:
        result = cache.run("s1", make_stage)
        assert "s1" not in cache.reused and result["report"] == {"made": True}
        assert result["files"] == {"out.bin": file_entry(folder / "out.bin")}
    finally:
        cache.close(remove=False)
    cache = StageCache(folder)  # the record it saved is valid and reused
    try:
        cache.run("s1", make_stage)
        assert cache.reused == ["s1"]
    finally:
        cache.close(remove=False)


def traversal_names(victim: Path, folder: Path) -> list[str]:
    rel = os.path.relpath(victim, folder)
    return [rel, str(victim), f"sub/../{rel}", "..", ".", f"..\\..\\..\\{victim.name}", "a\x00b", ""]


@pytest.mark.parametrize("index", range(8))
def test_stage_record_with_path_names_never_deletes_outside(victim: Path, folder: Path, index: int) -> None:
    """A record naming ``../..``, an absolute path, ``sub/..``, ``..``, backslashes or NUL is not a path to
    act on: the stage is redone and the user's file above the folder stays (it used to be deleted)."""
    name = traversal_names(victim, folder)[index]
    write_records(folder, {"s1": record({name: {"bytes": 1, "sha256": "0" * 64}})})
    messages: list[str] = []
    assert_redone(folder, messages)
    assert victim.read_text() == "my thesis"
    assert any("record of stage 's1' is not valid" in m for m in messages), messages


def test_record_naming_a_symlink_out_is_not_reused(victim: Path, folder: Path) -> None:
    """A listed file that is a symlink (even to a file with the recorded size and sha256) is not the stage's
    output: redone; the link is removed, never its target."""
    (folder / "out.bin").symlink_to(victim)
    write_records(folder, {"s1": record({"out.bin": file_entry(victim)})})
    assert_redone(folder)
    assert victim.read_text() == "my thesis" and not (folder / "out.bin").is_symlink()


JUNK = {
    "list": "[1, 2, 3]",
    "swapped types": json.dumps({"s1": record({"out.bin": {"bytes": "12", "sha256": 5}})}),
    "files as list": json.dumps({"s1": {"files": [["../x", 1]], "report": [], "seconds": "fast"}}),
    "null record": json.dumps({"s1": None}),
    "null entry": json.dumps({"s1": record({"out.bin": None})}),
    "extra keys": json.dumps({"s1": record({"out.bin": {"bytes": 12, "sha256": "a" * 64, "path": "/etc"}})}),
    "bool size": json.dumps({"s1": record({"out.bin": {"bytes": True, "sha256": "a" * 64}})}),
    "negative size": json.dumps({"s1": record({"out.bin": {"bytes": -1, "sha256": "a" * 64}})}),
    "inf size": '{"s1": {"files": {"out.bin": {"bytes": 1e400, "sha256": "' + "a" * 64 + '"}}, "report": {}}}',
    "huge int": '{"s1": {"files": {"out.bin": {"bytes": ' + "9" * 5000 + '}}}}',
    "nan seconds": '{"s1": {"files": {}, "report": {}, "seconds": NaN}}',
    "dropped string": json.dumps({"s1": record({}, dropped="yes")}),
    "report list": json.dumps({"s1": {"files": {}, "report": [1], "seconds": 1}}),
    "nested junk": json.dumps({"s1": {"files": {"out.bin": {"bytes": {"a": [{"b": []}]}}}}}),
    "invalid json": "{not json",
    "deep nesting": "[" * 200_000,
    "not utf-8": b"\xff\xfe{}",
    "huge file": json.dumps({"s1": record({}, pad="x" * (2 << 20))}),
    "bad stage name": json.dumps({"../s1": record({})}),
}


@pytest.mark.parametrize("case", sorted(JUNK))
def test_junk_record_is_treated_as_absent(folder: Path, case: str) -> None:
    """Wrong types, invalid JSON, deep nesting, huge values: the stage is redone, never a traceback."""
    write_records(folder, JUNK[case])
    assert_redone(folder)


def test_one_bad_record_does_not_cost_the_good_ones(folder: Path) -> None:
    (folder / "out.bin").write_bytes(STAGE_OUTPUT)
    write_records(folder, {"s1": record({"out.bin": file_entry(folder / "out.bin")}), "s2": [1, 2]})
    cache = StageCache(folder)
    try:
        cache.run("s1", make_stage)
        assert cache.reused == ["s1"] and cache.done("s1") and not cache.done("s2")
    finally:
        cache.close(remove=False)


GOOD_QUALITY = {"positions": 200, "kl_mean": 0.3, "kl_max": 0.9, "kl_p99": 0.8, "top1_agreement": 0.56}
BAD_QUALITY = [{}, {**GOOD_QUALITY, "positions": "200"}, {**GOOD_QUALITY, "positions": True},
               {**GOOD_QUALITY, "kl_mean": float("nan")}, {**GOOD_QUALITY, "top1_agreement": [1]}]
GOOD_INT8 = {"scheme": "dynamic-u8", "quality": {"heldout": {"images": 4, "cosine_min": 0.99, "cosine_mean": 0.999,
                                                             "rel_error_max": 0.1, "rel_error_mean": 0.01}}}
BAD_INT8 = [{}, {"scheme": "dynamic-u8", "quality": {}}, {"scheme": 3, "quality": GOOD_INT8["quality"]},
            {"scheme": "dynamic-u8", "quality": {"heldout": {"images": 4}}}]


@pytest.mark.parametrize(("stage", "report", "valid"),
                         [("llm_quality", GOOD_QUALITY, True), ("vision_int8", GOOD_INT8, True)]
                         + [("llm_quality", r, False) for r in BAD_QUALITY]
                         + [("vision_int8", r, False) for r in BAD_INT8])
def test_resumed_report_must_have_the_numbers_its_users_read(folder: Path, stage: str, report: dict,
                                                             valid: bool) -> None:
    """``llm_quality`` has no file to hash: its report read back is checked field by field (a junk one would
    go into the manifest and crash the CLI's summary); a bad one means the stage is redone."""
    from qwenvl_edge.bundler.bundle_export import STAGE_REPORTS

    write_records(folder, {stage: {"files": {}, "report": report, "seconds": 1.0}})
    cache = StageCache(folder, reports=STAGE_REPORTS)
    try:
        assert cache.done(stage) is valid
    finally:
        cache.close(remove=False)


def job_folder(ckpt: Path, opts: ExportOptions) -> Path:
    reader = CheckpointReader(ckpt)
    return export_cache_root() / job_fingerprint([*reader.files, reader.folder / "config.json"], _job_options(opts))


def test_export_with_crafted_records_and_force_on_a_real_bundle(tiny_ckpt: Path, f32_bundle: Path, tmp_path: Path,
                                                                monkeypatch, capsys) -> None:
    """End to end: a stages.json naming a user's file and one of the wrong type -> the export redoes those
    stages, exits 0, the user's file stays; ``--force`` replaces a verified old bundle (only its files)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    victim = tmp_path / "xdg" / "victim.txt"
    folder = job_folder(tiny_ckpt, ExportOptions(vision="fp32", llm="F16"))
    folder.mkdir(parents=True)
    victim.write_text("my thesis")
    write_records(folder, {"llm_gguf": record({os.path.relpath(victim, folder): {"bytes": 1, "sha256": "0" * 64}}),
                           "vision_fp32": [1, 2, 3]})
    out = Path(shutil.copytree(f32_bundle, tmp_path / "old"))
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(out), "--vision", "fp32", "--llm", "F16", "--force",
                          "--threads", "2"], capsys)
    assert rc == 0, err
    assert "Traceback" not in err and "not valid; redoing it" in err
    assert victim.read_text() == "my thesis"
    bundle = Bundle.open(out)
    assert bundle.manifest["llm"]["type"] == "F16"
    assert sorted(p.name for p in out.iterdir()) == sorted([*bundle.manifest["files"], "manifest.json"])
    assert not list(tmp_path.glob(".old*")) and not folder.exists()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crafted_folder(tmp_path: Path, files: dict, manifest_files=None, manifest=None) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if manifest is None:
        manifest = {"format": "qwenvl-edge-bundle", "format_version": 1, "files": manifest_files}
    (folder / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return folder


HOLIDAY = b"my holiday photo"
WRONG = {"bytes": len(HOLIDAY), "sha256": "0" * 64}
RIGHT = {"bytes": len(HOLIDAY), "sha256": sha(HOLIDAY)}
PARTS = {"vision.onnx": b"v" * 8, "llm.gguf": b"l" * 8}
PART_ENTRIES = {name: {"bytes": len(data), "sha256": sha(data)} for name, data in PARTS.items()}
MANIFESTS = {
    "lists the user's file, wrong sha256": ({"holiday.jpg": HOLIDAY, **PARTS},
                                            {"holiday.jpg": WRONG, **PART_ENTRIES}, "does not match"),
    "lists the user's file, wrong size": ({"holiday.jpg": HOLIDAY, **PARTS},
                                          {"holiday.jpg": {**RIGHT, "bytes": 3}, **PART_ENTRIES}, "does not match"),
    "no bundle parts, right sha256": ({"holiday.jpg": HOLIDAY}, {"holiday.jpg": RIGHT}, "not a qwenvl-edge bundle"),
    "parts listed but absent": ({"holiday.jpg": HOLIDAY}, {"holiday.jpg": RIGHT, **PART_ENTRIES}, "is missing"),
    "path names": ({"holiday.jpg": HOLIDAY}, {"../holiday.jpg": RIGHT, **PART_ENTRIES}, "not a qwenvl-edge bundle"),
    "files as list": ({"holiday.jpg": HOLIDAY}, ["holiday.jpg", "vision.onnx", "llm.gguf"],
                      "not a qwenvl-edge bundle"),
    "entries as names": ({"holiday.jpg": HOLIDAY}, {"holiday.jpg": "holiday.jpg", **PART_ENTRIES},
                         "not a qwenvl-edge bundle"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_force_refuses_a_crafted_manifest(tiny_ckpt: Path, tmp_path: Path, monkeypatch, capsys, case: str) -> None:
    """A folder whose manifest lists the user's file (or lies about it) is not replaced: one line, exit 2,
    before any stage runs, every file still there (``--force`` used to delete what such a manifest listed)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    files, listed, fragment = MANIFESTS[case]
    folder = crafted_folder(tmp_path, files, listed)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(folder), "--force"], capsys)
    assert_one_line_error(rc, err, fragment)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and "vision:" not in err


@pytest.mark.parametrize("manifest", ["[1, 2]", "{not json", "[" * 100_000, '{"format": "qwenvl-edge-bundle"}'])
def test_force_refuses_a_manifest_that_is_junk(tiny_ckpt: Path, tmp_path: Path, capsys, manifest: str) -> None:
    folder = crafted_folder(tmp_path, {"holiday.jpg": HOLIDAY}, manifest=manifest)
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(folder), "--force"], capsys)
    assert_one_line_error(rc, err, "not a qwenvl-edge bundle")
    assert (folder / "holiday.jpg").read_bytes() == HOLIDAY


def test_force_refuses_a_bundle_with_a_changed_file(tiny_ckpt: Path, f32_bundle: Path, tmp_path: Path,
                                                    capsys) -> None:
    """Same size, one byte changed: not verifiably the bundle the tool wrote, so not replaced."""
    copy = Path(shutil.copytree(f32_bundle, tmp_path / "b"))
    data = bytearray((copy / "llm.gguf").read_bytes())
    data[-1] ^= 0xFF
    (copy / "llm.gguf").write_bytes(bytes(data))
    rc, _, err = run_cli(["export", str(tiny_ckpt), str(copy), "--force"], capsys)
    assert_one_line_error(rc, err, "llm.gguf does not match")
    assert (copy / "llm.gguf").read_bytes() == bytes(data)


def small_bundle(folder: Path) -> Path:
    """A folder that passes ``--force``'s checks: bundle manifest, both parts, sizes and sha256 right."""
    folder.mkdir(parents=True)
    for name, data in PARTS.items():
        (folder / name).write_bytes(data)
    manifest = {"format": "qwenvl-edge-bundle", "format_version": 1, "files": PART_ENTRIES}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def new_work(tmp_path: Path) -> Path:
    work = tmp_path / ".b.partial-1"
    work.mkdir()
    (work / "llm.gguf").write_bytes(b"new")
    return work


def test_replace_deletes_only_the_verified_old_bundle(tiny_ckpt: Path, tmp_path: Path) -> None:
    from qwenvl_edge.bundler.export_target import check_target, replace_folder

    out = small_bundle(tmp_path / "b")
    old = check_target(tiny_ckpt, out, force=True)
    assert old is not None and replace_folder(new_work(tmp_path), out, old) is None
    assert sorted(p.name for p in out.iterdir()) == ["llm.gguf"] and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("change", ["file added", "file rewritten", "empty folder filled"])
def test_replace_refuses_what_changed_during_the_export(tiny_ckpt: Path, tmp_path: Path, change: str) -> None:
    """Between the check and the end of the export the user put a file in OUT (or rewrote one): nothing is
    deleted, the new bundle is not moved in, one line says why."""
    from qwenvl_edge.bundler.export_target import check_target, replace_folder
    from qwenvl_edge.errors import QwenVLError

    out = small_bundle(tmp_path / "b") if change != "empty folder filled" else tmp_path / "b"
    out.mkdir(exist_ok=True)
    old = check_target(tiny_ckpt, out, force=True)
    if change == "file rewritten":
        (out / "llm.gguf").write_bytes(b"user's new text")
    else:
        (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    work = new_work(tmp_path)
    with pytest.raises(QwenVLError, match="changed while the export ran"):
        replace_folder(work, out, old)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and work.is_dir()
