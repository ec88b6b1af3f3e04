"""The Android demo's links to the rest of the repository, checked without an Android SDK.

The app cannot be built on this machine (no SDK/NDK), so the cross-file facts it depends on are
checked here instead: the JNI class it compiles and the C++ functions behind it, the native targets it
packages, the one device pipeline (vision through the native core, no ONNX Runtime Java API, the AAR's
libonnxruntime.so handed to CMake and packaged), the KV/mmap choices it passes, the manifest keys it reads,
and the onnxruntime release it pins. Each check names the file to fix when it fails. The JNI at run time
is tested by NativeSmokeTest (tests/test_native_core.py).
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
JNI_CPP = ROOT / "native" / "jni" / "qwenvl_jni.cpp"
CMAKE = ROOT / "CMakeLists.txt"
ORT_CMAKE = ROOT / "native" / "cmake" / "QwenvlOrt.cmake"
PROGUARD = APP / "proguard-rules.pro"

# The JNI surface the app is written against (the contract).
NATIVE_METHODS = {
    "open": "long open(String ggufPath, int nCtx, int nThreads, String kvType, boolean useMmap)",
    "close": "void close(long handle)",
    "openVision": "long openVision(String onnxPath, int nThreads)",
    "imageSize": "int imageSize(long visionHandle)",
    "encodeImage": ("float[] encodeImage(long visionHandle, byte[] pixels, int width, int height, int channels, "
                    "float[] mean, float[] std)"),
    "encodeImageFile": "float[] encodeImageFile(long visionHandle, String imagePath, float[] mean, float[] std)",
    "encodePixels": "float[] encodePixels(long visionHandle, float[] pixels)",
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


# JNI parameter types, as the C++ side spells them for each Java type
JNI_TYPES = {"long": "jlong", "int": "jint", "float": "jfloat", "boolean": "jboolean", "String": "jstring",
             "byte[]": "jbyteArray", "float[]": "jfloatArray", "float[][]": "jobjectArray", "TokenCallback": "jobject"}


def jni_functions(source: str) -> dict[str, list[str]]:
    """name -> parameter types (after JNIEnv* and jclass) of every ``Java_ai_qwenvledge_QwenVLNative_*``."""
    found = {}
    for m in re.finditer(r"Java_ai_qwenvledge_QwenVLNative_(\w+)\(([^)]*)\)", source):
        params = [" ".join(p.split()) for p in m.group(2).split(",")]
        found[m.group(1)] = [p.split()[0] for p in params[2:]]
    return found


def test_every_native_method_has_a_jni_function_with_its_parameters():
    """Catches a Java signature changed without the C++ (UnsatisfiedLinkError on the phone, at the first call)."""
    functions = jni_functions(JNI_CPP.read_text())
    for name, signature in NATIVE_METHODS.items():
        assert name in functions, f"{JNI_CPP}: no Java_ai_qwenvledge_QwenVLNative_{name}"
        java_params = [p.rsplit(" ", 1)[0] for p in signature.split("(", 1)[1].rstrip(")").split(", ") if p]
        assert functions[name] == [JNI_TYPES[t] for t in java_params], f"{JNI_CPP}: {name} parameters"


def test_the_app_runs_vision_through_the_native_core_not_onnxruntime_java():
    """One device pipeline: no VisionEncoder.kt, no ai.onnxruntime import, no onnxruntime Java dependency."""
    assert not (KOTLIN / "VisionEncoder.kt").exists(), "the app must not carry its own vision step"
    for kt in KOTLIN.rglob("*.kt"):
        assert "ai.onnxruntime" not in kt.read_text(), f"{kt}: uses ONNX Runtime's Java API"
    gradle = GRADLE.read_text()
    assert not re.search(r"^\s*(implementation|api|runtimeOnly)\(libs\.onnxruntime", gradle, re.M), \
        f"{GRADLE}: the app must not depend on ONNX Runtime's Java API"
    assert "ai.onnxruntime" not in PROGUARD.read_text(), f"{PROGUARD}: keeps ONNX Runtime Java classes"
    calls = set()
    for kt in KOTLIN.rglob("*.kt"):
        calls |= set(re.findall(r"QwenVLNative\.(\w+)\(", kt.read_text()))
    assert {"openVision", "encodeImage", "imageSize", "open", "generate", "close"} <= calls, calls


def test_the_aar_libonnxruntime_is_handed_to_cmake_and_packaged():
    """The native build links the AAR's C library (the same release as the desktop's), and the APK carries it."""
    gradle = GRADLE.read_text()
    aar = r"onnxruntimeAar\(variantOf\(libs\.onnxruntime\.android\)\s*\{\s*artifactType\(\"aar\"\)"
    assert re.search(aar, gradle), f"{GRADLE}: the onnxruntime-android AAR (libs.onnxruntime.android) is not resolved"
    assert 'include("jni/arm64-v8a/libonnxruntime.so")' in gradle
    assert '"-DQWENVL_ORT_LIBRARY=${onnxruntimeLibrary.absolutePath}"' in gradle, f"{GRADLE}: CMake gets no ORT"
    assert "jniLibs.srcDir(onnxruntimeJniLibs)" in gradle, f"{GRADLE}: libonnxruntime.so is not packaged"
    assert re.search(r"set\(QWENVL_ORT_LIBRARY\b", ORT_CMAKE.read_text()), f"{ORT_CMAKE}: no QWENVL_ORT_LIBRARY"
    assert "abiFilters += \"arm64-v8a\"" in gradle, "the extracted library is the arm64-v8a one: the only ABI built"


@pytest.mark.parametrize("literal", ["q8_0", "f16"])
def test_kv_types_the_app_passes_are_accepted_by_jni(literal: str):
    """Catches a KV type name the app passes that the JNI side would refuse (IllegalArgumentException at load)."""
    kotlin = (KOTLIN / "ChatViewModel.kt").read_text()
    assert f'"{literal}"' in kotlin, f"ChatViewModel.kt never passes kvType {literal!r}"
    accepted = re.search(r"int32_t kv_type_from_name\(.*?\n}\n", JNI_CPP.read_text(), re.S).group(0)
    assert f'name == "{literal}"' in accepted, f"{JNI_CPP}: kvType {literal!r} is not accepted"


def test_decoder_open_passes_kv_type_and_mapping():
    """QwenDecoder hands both settings through; ChatViewModel reloads the model when either changes."""
    decoder = (KOTLIN / "QwenDecoder.kt").read_text()
    assert re.search(r"QwenVLNative\.open\(gguf\.absolutePath, nCtx, nThreads, kvType, mapWeights\)", decoder)
    model = (KOTLIN / "ChatViewModel.kt").read_text()
    assert "settings.kvQ8 != old.kvQ8" in model and "settings.mapWeights != old.mapWeights" in model
