"""Where a request's images may come from, and the checks they pass before the engine sees them.

Three sources, each under the operator's control: ``data:`` URIs (the bytes must be an image of
the type they claim), files under ``--media-dir`` (no path may leave it, symlinks included) and
http(s) URLs only with ``--allow-remote-images`` (size cap and timeout, as llama-server's 10 MB /
10 s). Every image leaves here as a ``data:`` URI of the exact bytes that were checked, so the
engine never opens a path or a URL on a client's behalf.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from qwenvl_edge.server.errors import APIError, bad_request
from qwenvl_edge.server.options import ServeConfig

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png",
           "image/x-ms-bmp": "image/bmp"}
_DATA_URI = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.S | re.I)


def check_image(data: bytes, declared: str | None, param: str, max_pixels: int) -> str:
    """The image's MIME type, after checking that ``data`` is an image of an allowed type, of the
    declared type (when one is declared) and within the pixel limit. Reads the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = im.format, im.size
    except Image.DecompressionBombError:
        raise bad_request("the image has more pixels than this server accepts", param, "image_too_large") from None
    except (OSError, ValueError, SyntaxError):
        raise bad_request("the image data is not a readable image", param, "invalid_image") from None
    mime = MIME.get(fmt or "")
    if mime is None:
        raise bad_request(f"unsupported image type {fmt}: use PNG, JPEG, WebP, GIF or BMP", param,
                          "unsupported_image_type")
    if declared and ALIASES.get(declared, declared) != mime:
        raise bad_request(f"the data URI says {declared} but the data is {mime}", param, "invalid_image")
    if width * height > max_pixels:
        raise bad_request(f"the image is {width} x {height} = {width * height} pixels, over this server's "
                          f"limit of {max_pixels}", param, "image_too_large")
    return mime


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class ImageResolver:
    """Turns each image URL of a request into a checked ``data:`` URI, or refuses the request."""

    def __init__(self, config: ServeConfig, http_client=None):
        self.config = config
        self.limits = config.limits
        self._http = http_client  # an httpx.AsyncClient, made on first remote fetch

    async def resolve(self, url: str, param: str) -> str:
        try:
            return await self._resolve(url, param)
        except (OSError, ValueError) as e:  # whatever else a client's URL makes the OS or a parser refuse
            raise bad_request(f"the image URL cannot be used ({type(e).__name__})", param,
                              "invalid_image_url") from None

    async def _resolve(self, url: str, param: str) -> str:
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme == "data":
            return self._from_data_uri(url, param)
        if scheme in ("http", "https"):
            return await self._from_remote(url, param)
        if scheme in ("file", "") or re.fullmatch(r"[a-zA-Z]", scheme):  # file://, a path (or C:\ on Windows)
            return self._from_media_dir(url, param)
        raise bad_request(f"unsupported image URL scheme '{scheme}:': use data:, a file under the media "
                          "folder, or http(s) when the server allows it", param, "invalid_image_url")

    def _from_data_uri(self, url: str, param: str) -> str:
        m = _DATA_URI.fullmatch(url)
        if not m or ";base64" not in m.group("params").lower():
            raise bad_request("a data: image URL must be data:<image type>;base64,<data>", param, "invalid_image_url")
        declared = m.group("mime").strip().lower()
        if declared and not declared.startswith("image/"):
            raise bad_request(f"the data URI's type is {declared}, not an image type", param, "invalid_image")
        try:
            data = base64.b64decode(re.sub(r"\s+", "", m.group("data")), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the data URI's base64 is not valid", param, "invalid_image_url") from None
        mime = check_image(data, declared or None, param, self.limits.max_image_pixels)
        return data_uri(data, mime)  # canonical: the engine never parses the client's spelling

    def _from_media_dir(self, url: str, param: str) -> str:
        media = self.config.media_dir
        if media is None:
            raise bad_request("local image files are not allowed: start the server with --media-dir", param,
                              "local_images_disabled")
        path = _client_path(url, param)
        try:
            real = (path if path.is_absolute() else media / path).resolve()
        except (OSError, RuntimeError, ValueError):
            real = None
        if real is None or not real.is_relative_to(media):
            raise bad_request("the image path is outside the server's media folder", param, "image_not_allowed")
        shown = _shown(path)
        try:  # every OS refusal of a client's path (too long, a folder, no permission) is the client's 400
            if not real.is_file():
                raise bad_request(f"no image file '{shown}' in the media folder", param, "image_not_found")
            if real.stat().st_size > self.limits.max_body_bytes:
                raise bad_request("the image file is larger than this server accepts", param, "image_too_large")
            data = real.read_bytes()
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise bad_request(f"cannot read the image file '{shown}' ({reason})", param, "image_not_found") from None
        return data_uri(data, check_image(data, None, param, self.limits.max_image_pixels))

    async def _from_remote(self, url: str, param: str) -> str:
        if not self.config.allow_remote_images:
            raise bad_request("remote image URLs are not allowed: start the server with --allow-remote-images "
                              "or send the image as a data: URI", param, "remote_images_disabled")
        try:
            data = await asyncio.wait_for(self._fetch(url, param), self.limits.remote_timeout_s)
        except asyncio.TimeoutError:
            raise bad_request(f"fetching the image took longer than {self.limits.remote_timeout_s:g} s", param,
                              "image_fetch_failed") from None
        return data_uri(data, check_image(data, None, param, self.limits.max_image_pixels))

    async def _fetch(self, url: str, param: str) -> bytes:
        import httpx

        cap = self.limits.remote_max_bytes
        too_big = bad_request(f"the remote image is larger than {cap // 2**20} MB", param, "image_too_large")
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.limits.remote_timeout_s, follow_redirects=True,
                                           max_redirects=3, trust_env=False)
        try:
            async with self._http.stream("GET", url) as r:
                if r.status_code != 200:
                    raise bad_request(f"fetching the image gave HTTP {r.status_code}", param, "image_fetch_failed")
                if int(r.headers.get("content-length") or 0) > cap:
                    raise too_big
                chunks, size = [], 0
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise too_big
                    chunks.append(chunk)
        except APIError:
            raise
        except (httpx.HTTPError, ValueError) as e:
            raise bad_request(f"cannot fetch the image ({type(e).__name__})", param, "image_fetch_failed") from None
        return b"".join(chunks)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


NAME_MAX = 255  # bytes in one file name (Linux, macOS, Windows alike)
PATH_MAX = 4096


def _client_path(url: str, param: str) -> Path:
    """The path a client named (plain or ``file:`` URL), refused with 400 when no file system could
    take it: a NUL byte, text that is not a file name, a name over 255 bytes, a remote ``file://`` host."""
    raw = url
    if url.lower().startswith("file:"):
        try:
            parsed = urlparse(url)
        except ValueError:
            raise bad_request("the file: URL is malformed", param, "invalid_image_url") from None
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"a file: URL names a file on this server, not on '{parsed.netloc[:40]}'", param,
                              "invalid_image_url")
        raw = unquote(parsed.path, errors="strict") if parsed.path else ""
    if not raw:
        raise bad_request("the image path is empty", param, "invalid_image_url")
    if "\0" in raw:
        raise bad_request("the image path contains a NUL character", param, "invalid_image_url")
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the image path is not valid text", param, "invalid_image_url") from None
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise bad_request(f"the image path is too long (at most {NAME_MAX} bytes a name, {PATH_MAX} in all)",
                          param, "invalid_image_url")
    return Path(raw)


def _shown(path: Path) -> str:
    """A client's path as an error message may quote it (short, one line)."""
    text = str(path)
    return text if len(text) <= 80 else text[:77] + "..."
