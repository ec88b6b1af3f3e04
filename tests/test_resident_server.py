"""A resident model (issue 28, item 5): ``serve --background``, ``ps``, ``stop``, ``run`` / ``chat`` answered by
the running server, the keep-alive unload and reload, one server per bundle, stale state files.

Real servers on free ports over the real tiny bundle; HOME and the XDG folders are the test's own
(``temp_home``), so the state files and logs live there and the servers are this test's only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from qwenvl_edge.server import registry
from qwenvl_edge.validate import DEFAULT_N_CTX
from tests.cli_helpers import assert_one_line_error, run_cli, run_process, temp_home  # noqa: F401

QUESTION = "What is in the picture?"


def serve_background(bundle: Path, *extra: str) -> tuple[str, dict]:
    """Start a background server; (its URL, its state file's contents)."""
    done = run_process(["serve", "--background", "--bundle", str(bundle), "--port", "0", "--threads", "1", *extra],
                       timeout=240)
    assert done.returncode == 0, done.stderr.decode()
    url = done.stdout.decode().strip()
    assert url.startswith("http://127.0.0.1:"), done.stdout
    server = registry.server_for(bundle)
    assert server is not None and server.url == url
    return url, server.info


def stop_all() -> None:
    """Stop whatever this test left running (SIGTERM through the command under test, then SIGKILL)."""
    servers = registry.live_servers()
    run_process(["stop", "--all"], timeout=60)
    for s in servers:
        if registry.held(s.path):
            os.kill(s.pid, signal.SIGKILL)


@pytest.fixture
def cleanup():
    yield
    stop_all()


def ps_status(url: str) -> dict:
    return httpx.get(url + "/api/ps", timeout=5).json()


def answer(bundle: Path, image: Path, *extra: str) -> tuple[str, str]:
    """``qwenvl-edge -v run`` as its own process: (stdout, stderr)."""
    done = run_process(["-v", "run", "--bundle", str(bundle), "--greedy", "--max-tokens", "12", "--threads", "1",
                        *extra, str(image), QUESTION], timeout=240)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode(), done.stderr.decode()


def test_background_server_answers_run_and_chat_as_this_process_would(f32_bundle: Path, golden, cleanup,
                                                                       temp_home: Path, monkeypatch) -> None:  # noqa: F811
    image = golden.images[sorted(golden.images)[0]]
    url, info = serve_background(f32_bundle)
    assert info["pid"] != os.getpid() and Path(info["bundle"]) == f32_bundle.resolve()
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    log = Path(info["log"])
    assert log.parent == temp_home / ".local/state/qwenvl-edge/servers" and log.is_file()

    ps = run_process(["ps"])
    assert ps.returncode == 0
    rows = ps.stdout.decode().splitlines()
    assert rows[0].split()[:3] == ["PID", "URL", "MODEL"]
    assert rows[1].split()[:3] == [str(info["pid"]), url, "loaded"] and str(f32_bundle.resolve()) in rows[1]

    remote_out, remote_err = answer(f32_bundle, image)
    local_out, local_err = answer(f32_bundle, image, "--no-resident")
    assert f"using the resident server on {url}" in remote_err and "[resident server" in remote_err
    assert "loading the model in this process (--no-resident)" in local_err
    assert remote_out == local_out and remote_out.strip()  # the same greedy answer, printed the same way

    monkeypatch.setenv("QWENVL_EDGE_NO_RESIDENT", "1")
    env_out = run_process(["-v", "run", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "12", "--threads",
                           "1", str(image), QUESTION])
    monkeypatch.delenv("QWENVL_EDGE_NO_RESIDENT")
    assert "QWENVL_EDGE_NO_RESIDENT is set" in env_out.stderr.decode()
    assert env_out.stdout.decode() == local_out

    # chat: two turns, the second resends the first (the server keeps its KV prefix)
    turns = f"/image {image}\n{QUESTION}\nAnd the colour?\n".encode()
    chats = [run_process(["-v", "chat", "--bundle", str(f32_bundle), "--greedy", "--max-tokens", "8", "--threads",
                          "1", *extra], stdin=turns, timeout=240) for extra in ([], ["--no-resident"])]
    assert all(c.returncode == 0 for c in chats), [c.stderr.decode() for c in chats]
    assert "using the resident server" in chats[0].stderr.decode()
    assert chats[0].stdout == chats[1].stdout and chats[0].stdout.decode().count("\n") == 2

    stop = run_process(["stop"], timeout=60)
    assert stop.returncode == 0 and f"stopped the server on {url}" in stop.stderr.decode()
    assert registry.live_servers() == [] and not registry.state_path(f32_bundle).exists()
    assert run_process(["ps"]).stdout == b""


def test_options_the_server_cannot_honour_load_in_process(f32_bundle: Path, tmp_path: Path, golden,
                                                          cleanup) -> None:
    image = golden.images[sorted(golden.images)[0]]
    url, _ = serve_background(f32_bundle, "--n-ctx", "1024")
    for extra, why in ((["--n-ctx", "1024", "--json"], "--json"), (["--n-ctx", "1024", "--no-cache"], "--no-cache"),
                       ([], f"--n-ctx {DEFAULT_N_CTX}")):
        out, err = answer(f32_bundle, image, *extra)
        assert f"the resident server on {url} cannot honour {why}" in err, err
        assert "loading the model in this process" in err
    out, err = answer(f32_bundle, image, "--n-ctx", "1024")
    assert f"using the resident server on {url}" in err


def drawn_both_ways(bundle: Path, image: Path, question: str, folder: Path) -> list[tuple[str, str, int, bytes]]:
    """``run --draw`` through the resident server, then in this process: (stdout, stderr, boxes drawn, PNG)."""
    found = []
    for name, extra in (("resident", []), ("local", ["--no-resident"])):
        png = folder / f"{name}.png"
        done = run_process(["-v", "run", "--bundle", str(bundle), "--greedy", "--max-tokens", "40", "--threads", "1",
                            "--draw", str(png), *extra, str(image), question], timeout=240)
        assert done.returncode == 0, done.stderr.decode()
        err = done.stderr.decode()
        found.append((done.stdout.decode(), err, int(re.search(r"\[drew (\d+) box", err).group(1)), png.read_bytes()))
    return found


def test_boxes_through_the_resident_server_are_drawn_as_in_process(trained_f32_bundle: Path, tmp_path: Path,
                                                                    cleanup) -> None:
    from qwenvl_edge.evaluation import task_images

    sample = task_images.make_set("grounding", 1, 5)[0]
    image = tmp_path / "grounding.png"
    sample.image.save(image)
    url, _ = serve_background(trained_f32_bundle)
    resident, local = drawn_both_ways(trained_f32_bundle, image, sample.question, tmp_path)
    assert f"using the resident server on {url}" in resident[1] and "in this process" in local[1]
    assert resident[0] == local[0] and "<box>" in resident[0]  # the same answer, with its box
    assert resident[2] == local[2] >= 1 and resident[3] == local[3]  # the same boxes drawn on the same picture


def test_keep_alive_unloads_the_idle_model_and_the_next_request_reloads_it(f32_bundle: Path, golden,
                                                                           cleanup) -> None:
    image = golden.images[sorted(golden.images)[0]]
    url, info = serve_background(f32_bundle, "--keep-alive", "1s")
    assert info["keep_alive_s"] == 1.0
    deadline = time.monotonic() + 30
    while ps_status(url)["state"] != "unloaded":
        assert time.monotonic() < deadline, ps_status(url)
        time.sleep(0.2)
    assert httpx.get(url + "/health", timeout=5).status_code == 200  # unloaded, but ready to load again
    assert "unloaded" in run_process(["ps"]).stdout.decode()
    remote_out, remote_err = answer(f32_bundle, image)
    assert "using the resident server" in remote_err
    status = ps_status(url)
    assert status["loads"] == 2 and status["unloads"] >= 1
    local_out, _ = answer(f32_bundle, image, "--no-resident")
    assert remote_out == local_out
    assert "model unloaded after 1 s idle" in Path(info["log"]).read_text()


def test_keep_alive_never_and_zero(f32_bundle: Path, tmp_path: Path, golden, cleanup) -> None:
    image = golden.images[sorted(golden.images)[0]]
    url, info = serve_background(f32_bundle, "--keep-alive", "-1")
    assert info["keep_alive_s"] is None
    time.sleep(1.5)
    assert ps_status(url)["state"] == "loaded" and ps_status(url)["unloads_in_s"] is None
    copy = tmp_path / "copy"
    shutil.copytree(f32_bundle, copy)
    url0, info0 = serve_background(copy, "--keep-alive", "0")
    assert info0["keep_alive_s"] == 0.0
    answer(copy, image)
    assert ps_status(url0)["state"] == "unloaded" and ps_status(url0)["unloads"] == 1  # right after the request


def test_a_second_server_on_the_same_bundle_is_refused(f32_bundle: Path, tmp_path: Path, cleanup) -> None:
    url, info = serve_background(f32_bundle)
    again = run_process(["serve", "--background", "--bundle", str(f32_bundle), "--port", "0"], timeout=120)
    assert_one_line_error(again.returncode, again.stderr.decode(), "already running", f"pid {info['pid']}", url)
    foreground = run_process(["serve", "--bundle", str(f32_bundle), "--port", "0"], timeout=120)
    assert_one_line_error(foreground.returncode, foreground.stderr.decode(), "already running", url)
    port = int(url.rsplit(":", 1)[1])  # the port of a running server, for another bundle: the bind fails
    copy = tmp_path / "copy"
    shutil.copytree(f32_bundle, copy)
    other = run_process(["serve", "--background", "--bundle", str(copy), "--port", str(port)], timeout=120)
    assert_one_line_error(other.returncode, other.stderr.decode(), "the server did not start", "cannot listen")
    assert registry.server_for(copy) is None
    assert httpx.get(url + "/health", timeout=5).status_code == 200  # the first one is untouched


def test_a_server_that_cannot_start_prints_its_error(f32_bundle: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = run_process(["serve", "--background", "--bundle", str(f32_bundle), "--port", str(port)], timeout=120)
    assert_one_line_error(done.returncode, done.stderr.decode(), "the server did not start", f"cannot listen on "
                          f"127.0.0.1:{port}", "log: ")
    missing = run_process(["serve", "--background", "--bundle", str(tmp_path / "nothing")], timeout=120)
    assert_one_line_error(missing.returncode, missing.stderr.decode(), "not a qwenvl-edge bundle")
    bad = run_process(["serve", "--background", "--keep-alive", "soon"])
    assert_one_line_error(bad.returncode, bad.stderr.decode(), "--keep-alive must be")
    assert registry.live_servers() == []


def test_a_killed_server_leaves_a_stale_state_file_that_ps_run_and_serve_ignore(f32_bundle: Path, golden,
                                                                                cleanup) -> None:
    image = golden.images[sorted(golden.images)[0]]
    url, info = serve_background(f32_bundle)
    os.kill(info["pid"], signal.SIGKILL)
    path = registry.state_path(f32_bundle)
    deadline = time.monotonic() + 10
    while registry.held(path):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert path.exists() and json.loads(path.read_text())["pid"] == info["pid"]  # left behind, stale
    ps = run_process(["-v", "ps"])
    assert ps.stdout == b"" and "its server is gone" in ps.stderr.decode()
    _, err = answer(f32_bundle, image)
    assert "loading the model in this process (no resident server runs on this bundle)" in err
    stop = run_process(["stop"])
    assert stop.returncode == 0 and "no resident server is running" in stop.stderr.decode()
    url2, info2 = serve_background(f32_bundle)  # the stale file is replaced, not a refusal
    assert info2["pid"] != info["pid"]


def test_stop_names_one_of_several_or_all(f32_bundle: Path, tmp_path: Path, capsys, cleanup) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(f32_bundle, copy)
    serve_background(f32_bundle)
    url2, _ = serve_background(copy)
    rc, _, err = run_cli(["stop"], capsys)
    assert_one_line_error(rc, err, "2 resident servers are running", "--all")
    rc, _, err = run_cli(["stop", "--bundle", str(tmp_path / "elsewhere")], capsys)
    assert_one_line_error(rc, err, "no resident server runs on the bundle")
    rc, _, err = run_cli(["stop", "--bundle", str(copy)], capsys)
    assert rc == 0 and f"stopped the server on {url2}" in err
    assert [s.bundle for s in registry.live_servers()] == [str(f32_bundle.resolve())]
    rc, _, err = run_cli(["stop", "--all"], capsys)
    assert rc == 0 and registry.live_servers() == []
