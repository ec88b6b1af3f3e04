"""``qwenvl-edge batch --ray`` (issue 27) on a local Ray cluster this module starts (2 CPUs, no dashboard, in a
temporary folder) and stops: two actors give exactly ``run --batch``'s greedy answers on the 40 task images, a
rerun skips the ids in OUT, a corrupted row is an error row, a worker killed mid-job is restarted and its batch
run again with no row lost or doubled, a worker whose bundle differs is named in one line.

Long (each job loads the model once per actor on a shared 2-core machine): ``python -m pytest -m long``.
Under CI=true a missing ray fails instead of skipping (.ci/run installs the ``ray`` extra)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cli_helpers import assert_one_line_error, run_cli, temp_home  # noqa: F401
from tests.test_batch_local import SAMPLING, assert_same_answers, batch, make_task_set, read_out, row_id

pytestmark = pytest.mark.long
ON_RAY = ["--ray", "auto", "--threads-per-actor", "1"]


def need_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        message = "ray is not installed: pip install -e '.[ray]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return ray


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of this test process (its files in a temporary folder, never under HOME): its address."""
    ray = need_ray()
    folder = tempfile.mkdtemp(prefix="qwray-", dir="/tmp")  # short: Ray's socket paths live under it
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=folder, log_to_driver=False,
             logging_level=logging.ERROR)
    token = Path.home() / ".ray" / "auth_token"  # Ray 2.60's token auth: another driver needs the token
    try:
        yield ray.get_runtime_context().gcs_address, token
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def task_set(trained_default_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The 40 task images and ``run --batch``'s answers (shared with test_batch_local.py when both run)."""
    return make_task_set(trained_default_bundle, tmp_path_factory)


def copy_rows(task_set, folder: Path, n: int) -> tuple[Path, dict[str, dict]]:
    """The first ``n`` task rows, with their images, in ``folder``; and their reference answers."""
    src, reference = task_set
    lines = src.read_text().splitlines()[:n]
    for line in lines:
        for image in json.loads(line)["images"]:
            shutil.copy(src.parent / image, folder)
    small = folder / "in.jsonl"
    small.write_text("\n".join(lines) + "\n")
    return small, {row_id(json.loads(line), k): reference[row_id(json.loads(line), k)]
                   for k, line in enumerate(lines, 1)}


def test_two_actors_give_run_batch_answers_and_a_rerun_skips_the_done(cluster, trained_default_bundle: Path,
                                                                      task_set, tmp_path: Path, capsys) -> None:
    src, reference = task_set
    out = tmp_path / "out.jsonl"
    rc, err = batch(trained_default_bundle, src, out, capsys, *ON_RAY, "--actors", "2", "--batch-size", "4")
    assert rc == 0, err
    assert_same_answers(read_out(out), reference)
    assert "batch: 40/40 rows (40 this run" in err
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:10]))
    rc, err = batch(trained_default_bundle, src, out, capsys, *ON_RAY, "--actors", "2", "--batch-size", "4")
    assert rc == 0, err
    assert out.read_bytes().splitlines(keepends=True)[:10] == lines[:10]
    assert_same_answers(read_out(out), reference)
    assert f"batch: 10 of 40 rows are in {out} already: skipped" in err and "(30 this run" in err


def test_a_corrupted_row_is_an_error_row_on_ray(cluster, trained_default_bundle: Path, task_set, tmp_path: Path,
                                                capsys) -> None:
    small, reference = copy_rows(task_set, tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    with small.open("a") as f:
        f.write(json.dumps({"id": "broken", "images": ["broken.png"], "question": "What color is the shape?"}) + "\n")
    out = tmp_path / "out.jsonl"
    rc, err = batch(trained_default_bundle, small, out, capsys, *ON_RAY, "--actors", "1", "--batch-size", "2", "-q")
    assert_one_line_error(rc, err, "1 of 4 rows failed")
    rows = {row["id"]: row for row in read_out(out)}
    assert set(rows["broken"]) == {"id", "error"} and "broken.png" in rows["broken"]["error"]
    assert_same_answers([row for ident, row in rows.items() if ident != "broken"], reference)


def test_a_worker_whose_bundle_differs_is_named_in_one_line(cluster, trained_default_bundle: Path, tmp_path: Path,
                                                            capsys) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_default_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = next(n for n in manifest["files"] if n.endswith(".onnx"))
    data = bytearray((bundle / name).read_bytes())
    data[-1] ^= 0xFF
    (bundle / name).write_bytes(bytes(data))
    src = tmp_path / "in.jsonl"
    src.write_text('{"question": "Hi"}\n{"question": "Ho"}\n')
    out = tmp_path / "out.jsonl"
    rc, err = batch(bundle, src, out, capsys, *ON_RAY, "--actors", "1", "-q")
    assert_one_line_error(rc, err, f"{bundle / name}: checksum differs from the manifest", "worker ")
    assert not out.exists() or out.read_text() == ""


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        chain.append(pid)
    return chain


def our_workers() -> list[int]:
    """The pids of this cluster's map actors: ``ray::MapWorker...`` processes below this test process."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::MapWorker") and os.getpid() in ancestors(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def environ_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


def test_a_killed_worker_is_restarted_and_no_row_is_lost_or_doubled(cluster, trained_default_bundle: Path, task_set,
                                                                     tmp_path: Path) -> None:
    src, reference = task_set
    out = tmp_path / "out.jsonl"
    address, token = cluster
    cmd = [sys.executable, "-m", "qwenvl_edge", "batch", str(src), str(out), "--bundle", str(trained_default_bundle),
           *SAMPLING, "--ray", address, "--actors", "2", "--threads-per-actor", "1", "--batch-size", "1"]
    env = {**os.environ, **({"RAY_AUTH_TOKEN_PATH": str(token)} if token.is_file() else {})}
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 2, 400, "the first answers")
        workers = wait_for(our_workers, 60, "the actors' processes")
        victim = workers[0]
        assert environ_of(victim).get("QWENVL_EDGE_THREADS") == "1"  # --threads-per-actor reached the actor
        done_before = out.read_bytes().count(b"\n")
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=500)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, stderr.decode()[-3000:]
    assert stderr.decode().splitlines()[-1] == f"batch: 40 rows answered into {out}"
    assert done_before < 40, "the job ended before the worker was killed: nothing was tested"
    assert victim not in our_workers()
    assert_same_answers(read_out(out), reference)  # every id once, each with its local answer
