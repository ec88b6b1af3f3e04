"""Every image URL a client can spell is answered: a path or ``file:`` URL the file system refuses (a name over
255 bytes, a NUL, a folder, a loop, bad percent-encoding) is a 400 in OpenAI's error shape that names the part,
never a 500; odd but valid ``data:`` URIs are read, odd invalid ones are 400.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.server_harness import ServerProcess
from tests.test_server import MODEL, assert_error, user

PARAM = "messages[0].content[0]"


@pytest.fixture(scope="module")
def media(golden, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    shutil.copy(golden.images["sign"], folder / "sign.png")
    (folder / "sub").mkdir()
    os.symlink("loop", folder / "loop")  # a link to itself
    return folder


@pytest.fixture(scope="module")
def server(f32_bundle, media, tmp_path_factory):
    s = ServerProcess(f32_bundle, tmp_path_factory.mktemp("media-server"), "--media-dir", str(media))
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()


def ask(server: ServerProcess, url: str) -> httpx.Response:
    body = {"model": MODEL, "messages": user("what is it?", url), "max_tokens": 2}
    return httpx.post(server.url + "/v1/chat/completions", timeout=60, content=json.dumps(body),  # \u escapes
                      headers={"Content-Type": "application/json"})


LONG_NAME = "a" * 300 + ".png"
REFUSED = {
    "name over 255 bytes": (LONG_NAME, "invalid_image_url"),
    "multibyte name over 255 bytes": ("é" * 130 + ".png", "invalid_image_url"),
    "long folder name": ("x" * 256 + "/sign.png", "invalid_image_url"),
    "long file URL": ("file:///" + "b" * 300, "invalid_image_url"),
    "long percent-encoded file URL": ("file:///" + "%61" * 300, "invalid_image_url"),
    "path over 4096 bytes": ("/".join(["d" * 200] * 25), "invalid_image_url"),
    "NUL in a path": ("sign\u0000.png", "invalid_image_url"),
    "NUL in a file URL": ("file:///sign%00.png", "invalid_image_url"),
    "bad percent-encoding": ("file:///%ff%fe.png", "invalid_image_url"),
    "malformed file URL": ("file://[::1/sign.png", "invalid_image_url"),
    "file URL of another host": ("file://example.com/sign.png", "invalid_image_url"),
    "empty file URL": ("file://", "invalid_image_url"),
    "a folder": ("sub", "image_not_found"),
    "a symlink loop": ("loop", "image_not_allowed"),
    "lone surrogate": ("sign\ud800.png", None),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_path_the_file_system_refuses_is_400(server, name) -> None:
    url, code = REFUSED[name]
    assert_error(ask(server, url), 400, code, param=PARAM if code else None)


def test_after_the_refusals_a_good_path_still_works(server, media) -> None:
    for url in ("sign.png", f"file://{media}/sign.png", "file://localhost" + str(media / "sign.png")):
        assert ask(server, url).status_code == 200, url


def png_b64(golden) -> str:
    return base64.b64encode(golden.images["sign"].read_bytes()).decode()


def test_odd_but_valid_data_uris_are_read(server, golden) -> None:
    data = png_b64(golden)
    wrapped = "\n".join(data[i:i + 76] for i in range(0, len(data), 76))  # MIME line breaks
    for url in (f"DATA:image/PNG;BASE64,{data}", f"data:image/png;base64,{wrapped}",
                f"data:image/png;name=sign.png;base64,{data}", f"data:;base64,{data}"):
        r = ask(server, url)
        assert r.status_code == 200, (url[:40], r.text)


@pytest.mark.parametrize("url", ["data:,", "data:image/png;base64,", "data:image/png;base64,é" + "A" * 8,
                                 "data:image/png;base64", "data:text/html;base64,PGI+", "data:image/png;base64,===="])
def test_odd_invalid_data_uris_are_400(server, url) -> None:
    err = assert_error(ask(server, url), 400, param=PARAM)
    assert err["code"] in ("invalid_image_url", "invalid_image")
