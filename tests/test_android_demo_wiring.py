"""The Android demo's links to the rest of the repository, checked without an Android SDK.

The app cannot be built on this machine (no SDK/NDK), so the cross-file facts it depends on are
checked here instead: the JNI class it compiles, the native targets it packages, the manifest keys
it reads, and the onnxruntime release it pins. Each check names the file to fix when it fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnxruntime
import pytest

from qwenvl_edge import contract
from qwenvl_edge.runtime.bundle import LLM_FILE, VISION_FILE, ModelInfo, make_manifest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "android_demo" / "app"
GRADLE = APP / "build.gradle.kts"
KOTLIN = APP / "src" / "main" / "java" / "ai" / "qwenvledge" / "demo"
JAVA = ROOT / "native" / "java" / "ai" / "qwenvledge" / "QwenVLNative.java"
CMAKE = ROOT / "CMakeLists.txt"

# The JNI surface the app is written against (the contract).
NATIVE_METHODS = {
    "open": "long open(String ggufPath, int nCtx, int nThreads)",
    "close": "void close(long handle)",
    "preprocess": ("float[] preprocess(byte[] pixels, int width, int height, int channels, int imageSize, "
                   "float[] mean, float[] std)"),
    "generate": ("String generate(long handle, float[][] imageRows, String question, int maxTokens, "
                 "float temperature, float topP, TokenCallback callback)"),
    "resetChat": "void resetChat(long handle)",
    "embeddingSize": "int embeddingSize(long handle)",
}


def java_native_methods(source: str) -> dict[str, str]:
    """name -> 'ret name(params)' of every `public static native` method, whitespace normalised."""
    found = {}
    for m in re.finditer(r"public\s+static\s+native\s+([\w\[\]]+)\s+(\w+)\s*\(([^)]*)\)", source):
        params = ", ".join(" ".join(p.split()) for p in m.group(3).split(","))
        found[m.group(2)] = f"{m.group(1)} {m.group(2)}({params})"
    return found


def test_jni_class_is_compiled_from_native_java_with_the_contract_signatures():
    gradle = GRADLE.read_text()
    assert 'java.srcDir(repoRoot.resolve("native/java"))' in gradle, f"{GRADLE}: must compile native/java"
    assert JAVA.is_file(), f"{JAVA} is missing: the app compiles it"
    source = JAVA.read_text()
    assert java_native_methods(source) == NATIVE_METHODS
    assert re.search(r"interface\s+TokenCallback\s*\{\s*(/\*\*.*?\*/\s*)?boolean\s+onToken\(String\s+\w+\);",
                     source, re.S), f"{JAVA}: TokenCallback.onToken(String) changed"
    app_dup = list((ROOT / "android_demo").rglob("QwenVLNative.java"))
    assert not app_dup, f"the app must not carry its own copy: {app_dup}"


def test_app_calls_only_declared_native_methods():
    calls = set()
    for kt in KOTLIN.rglob("*.kt"):
        calls |= set(re.findall(r"QwenVLNative\.(\w+)\(", kt.read_text()))
    assert calls, "the app never calls QwenVLNative"
    assert calls <= set(NATIVE_METHODS), f"unknown QwenVLNative methods used: {calls - set(NATIVE_METHODS)}"


def test_packaged_native_targets_exist_in_the_top_level_cmake():
    library = re.search(r'System\.loadLibrary\("(\w+)"\)', JAVA.read_text()).group(1)
    targets_line = re.search(r"targets \+= listOf\(([^)]*)\)", GRADLE.read_text())
    assert targets_line, f"{GRADLE}: no `targets += listOf(...)`"
    targets = re.findall(r'"(\w+)"', targets_line.group(1))
    assert library in targets, f"{GRADLE}: loadLibrary('{library}') is not a packaged target {targets}"
    if not CMAKE.is_file():
        pytest.skip(f"{CMAKE} not written yet")
    cmake = CMAKE.read_text()
    for target in targets:
        assert re.search(rf"add_library\(\s*{target}\s+SHARED", cmake), f"{CMAKE}: no shared library '{target}'"


def test_onnxruntime_android_matches_the_desktop_runtime():
    toml = (ROOT / "android_demo" / "gradle" / "libs.versions.toml").read_text()
    pinned = re.search(r'^onnxruntime\s*=\s*"([^"]+)"', toml, re.M).group(1)
    assert pinned == onnxruntime.__version__, "pin onnxruntime-android to the desktop onnxruntime release"


def test_manifest_keys_the_app_reads_are_written_by_the_exporter(tmp_path: Path):
    """BundleStore.kt reads model.* keys with getInt/optInt/...: each must be in a real manifest."""
    for name in ("vision.onnx", "llm.gguf"):
        (tmp_path / name).write_bytes(b"x" * 10)
    info = ModelInfo(hidden_size=4096, vocab_size=151936, seq_length=2048, image_size=448, n_queries=256,
                     image_start_id=contract.IMAGE_START_ID)
    manifest = make_manifest(tmp_path, info, {"precision": "int8"}, {"type": "Q4_K_M"}, {}, "test")
    source = (KOTLIN / "BundleStore.kt").read_text()
    model_keys = set(re.findall(r'model\.(?:get|opt)\w*\("(\w+)"', source))
    assert {"image_size", "hidden_size"} <= model_keys
    unwritten = model_keys - set(manifest["model"])
    assert not unwritten, f"{KOTLIN / 'BundleStore.kt'} reads manifest keys the exporter does not write: {unwritten}"
    assert manifest["format"] == re.search(r'FORMAT = "([^"]+)"', source).group(1)
    assert manifest["format_version"] == int(re.search(r"FORMAT_VERSION = (\d+)", source).group(1))
    assert set(re.findall(r'optString\("file", "([^"]+)"\)', source)) == {VISION_FILE, LLM_FILE}
    for entry in manifest["files"].values():  # BundleStore.requiredFiles: getLong("bytes"), getString("sha256")
        assert isinstance(entry["bytes"], int) and len(entry["sha256"]) == 64
