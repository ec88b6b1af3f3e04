"""Fetch the llama.cpp headers (or the whole source) of the llama-cpp-python version installed here.

Why: the llama-cpp-python wheel ships ``libllama.so`` but no headers, and the native core must be
compiled against exactly the API of the library it links. The headers are taken from the same
version's source distribution on PyPI (its ``vendor/llama.cpp`` is the pinned llama.cpp), unpacked
into a cache folder outside the repository, and their folders are printed for CMake:

    python native/get_llama_cpp_source.py --version 0.3.36            # -> two include folders
    python native/get_llama_cpp_source.py --version 0.3.36 --full     # -> a llama.cpp source folder

``--full`` unpacks all of ``vendor/llama.cpp``: point ``-DLLAMA_CPP_DIR`` at it for the Android build.
An already unpacked cache is reused. ``QWENVL_LLAMA_SDIST`` (or ``--sdist``) may name a local copy of
the sdist tarball to skip the download (offline machines); its version must match.
Output: the folders, one per line, on stdout; messages on stderr; exit code 1 with one line on failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HEADER_DIRS = ("vendor/llama.cpp/include", "vendor/llama.cpp/ggml/include")
FULL_DIR = "vendor/llama.cpp"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwenvl-edge"


def installed_version() -> str:
    """The llama-cpp-python version of this interpreter (without importing the shared library)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python, "
                         "or pass --version") from None


def download_sdist(version: str, into: Path) -> Path:
    """``pip download`` the source distribution of llama-cpp-python==version (no build, no deps)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(into)]
    print(f"downloading the llama-cpp-python {version} sdist for the llama.cpp headers ...", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"pip download llama-cpp-python=={version} failed: {last}")
    return found[0]


def members_under(tar: tarfile.TarFile, prefixes: tuple[str, ...]) -> list[tarfile.TarInfo]:
    """The regular files and folders of ``tar`` under one of ``prefixes`` (relative to its top folder)."""
    chosen = []
    for member in tar.getmembers():
        parts = member.name.split("/", 1)
        if len(parts) < 2 or not (member.isfile() or member.isdir()):
            continue
        rel = parts[1]
        if ".." in Path(rel).parts or rel.startswith("/") or ".git" in Path(rel).parts:
            continue  # unsafe paths; the submodule's .git link points outside the unpacked tree
        if any(rel == p or rel.startswith(p + "/") for p in prefixes):
            chosen.append(member)
    return chosen


def unpack(sdist: Path, version: str, prefixes: tuple[str, ...], dest: Path) -> None:
    """Unpack ``prefixes`` of ``sdist`` into ``dest`` through a temporary folder and one rename."""
    with tarfile.open(sdist, "r:gz") as tar:
        top = tar.getmembers()[0].name.split("/", 1)[0]
        if top != f"llama_cpp_python-{version}":
            raise SystemExit(f"{sdist}: holds {top}, not llama_cpp_python-{version}")
        members = members_under(tar, prefixes)
        if not members:
            raise SystemExit(f"{sdist}: has no {', '.join(prefixes)}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        try:
            for member in members:
                target = tmp / member.name.split("/", 1)[1]
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            try:
                tmp.rename(dest)
            except OSError:
                if not dest.is_dir():  # another process may have finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def fetch(version: str, cache: Path, full: bool, sdist: Path | None) -> list[Path]:
    dest = cache / f"llama-cpp-python-{version}" / ("source" if full else "headers")
    wanted = [dest / FULL_DIR] if full else [dest / d for d in HEADER_DIRS]
    marker = wanted[0] / ("CMakeLists.txt" if full else "llama.h")
    if not marker.is_file():
        prefixes = (FULL_DIR,) if full else HEADER_DIRS
        if sdist is not None:
            if not sdist.is_file():
                raise SystemExit(f"{sdist}: no such sdist file")
            unpack(sdist, version, prefixes, dest)
        else:
            with tempfile.TemporaryDirectory(prefix="qwenvl-sdist-") as tmp:
                unpack(download_sdist(version, Path(tmp)), version, prefixes, dest)
    if not marker.is_file():
        raise SystemExit(f"{marker}: missing after unpacking the sdist")
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help="llama-cpp-python version (default: the installed one)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default: $XDG_CACHE_HOME/qwenvl-edge or ~/.cache/qwenvl-edge)")
    parser.add_argument("--full", action="store_true", help="unpack all of vendor/llama.cpp (for LLAMA_CPP_DIR)")
    parser.add_argument("--sdist", type=Path, default=None,
                        help="use this local sdist tarball instead of downloading (or set QWENVL_LLAMA_SDIST)")
    args = parser.parse_args(argv)
    try:
        version = args.version or installed_version()
        env_sdist = os.environ.get("QWENVL_LLAMA_SDIST")
        sdist = args.sdist or (Path(env_sdist) if env_sdist else None)
        for folder in fetch(version, args.cache or default_cache(), args.full, sdist):
            print(folder)
    except SystemExit as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
