"""The native core (libqwenvl_core, the JNI bridge and their tests) built with CMake and run on the golden.

What it pins down:
- CMake configures and builds libqwenvl_core, libqwenvl_jni and the native test binary against the
  libllama of the installed llama-cpp-python (only our small sources compile), into
  ``<repo>/native-build/`` which is kept between runs;
- ctest passes: the native test groups (bad input, tokenizer, prompt and greedy parity with the
  golden, the KV cache across turns, preprocessing) and the Java smoke test through JNI, which runs the
  device pipeline (image file or bytes -> vision -> vision freed -> decoder -> answer) golden-exact on the F32
  bundle, and with ``open(..., "q8_0", true)`` the same answers as ``qwenvl-native --kv q8_0 --mmap``;
- through ctypes: the native prompt ids equal the golden ``input_ids`` for every case, the greedy
  ids equal ``generated_ids`` for the image and text cases, a follow-up turn decodes only its new
  tokens and gives what llama-cpp-python gives on the same ids, and a checkpoint of other sizes works;
- the ctest suite passes once more under AddressSanitizer + UBSan (``-DQWENVL_SANITIZE=ON``).
The tiny GGUF is the project's own export (``write_llm_gguf``, F32) of the golden checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from PIL import Image

from qwenvl_edge import contract
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.llm_gguf import write_llm_gguf
from qwenvl_edge.runtime.preprocess import ImageSpec, preprocess_image
from tests.native_build import BUILD_ROOT, REPO, build_native, needs_cmake
from tests.test_model_facts_bundle import OTHER_MEAN, OTHER_STD
from tests.test_model_facts_images import alpha_ramp

IMAGE_ROWS = contract.N_QUERIES
PROMPT_FIXTURE = REPO / "tests" / "data" / "multi_turn_prompt.json"
IMAGE_POSITION = -1
GREEDY_CASES = ["one_image", "two_images", "text_only", "grounding"]  # golden/README: ids identical in F32
JAVA_PIPELINE_CASES = ["one_image", "two_images", "text_only"]  # NativeSmokeTest: image -> vision -> answer
STOP_IDS = {contract.EOS_ID, contract.IM_START_ID, contract.IM_END_ID}

pytestmark = needs_cmake


def run_ctest(build_dir: Path, data_dir: Path, exclude: str | None = None) -> str:
    """All ctest tests with the golden data; fails on any failure, and on any skip (nothing may skip here)."""
    env = {**os.environ, "QWENVL_TEST_DATA": str(data_dir)}
    cmd = ["ctest", "--test-dir", str(build_dir), "--output-on-failure", "--timeout", "300"]  # one at a time: 2 cores
    if exclude:
        cmd += ["-E", exclude]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ctest failed:\n{out[-12000:]}"
    assert "100% tests passed" in out and "Not Run" not in out, out[-4000:]
    assert "Skipped" not in out, f"a test was skipped:\n{out[-4000:]}"
    return out


# --- golden data for the native tests -------------------------------------------------------------

def write_test_data(folder: Path, golden, gguf: Path, n_embd: int) -> Path:
    """The folder QWENVL_TEST_DATA names (format: native/tests/test_data.h)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"gguf {gguf}", f"n_embd {n_embd}", f"max_new_tokens {golden.max_new_tokens}"]
    for name, path in golden.images.items():
        golden.vision(name).astype("<f4").tofile(folder / f"{name}.f32")
        pixels = golden.pixels(name)  # (3, S, S)
        pixels.astype("<f4").tofile(folder / f"{name}.pixels.f32")
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        rgb.tofile(folder / f"{name}.rgb")
        lines += [f"rgb {name} {rgb.shape[1]} {rgb.shape[0]}", f"image_size {pixels.shape[-1]}"]
    lines += ["image_mean " + " ".join(map(repr, contract.IMAGE_MEAN)),
              "image_std " + " ".join(map(repr, contract.IMAGE_STD))]
    lines += write_model_facts_data(folder, golden)
    fixture = json.loads(PROMPT_FIXTURE.read_text(encoding="utf-8"))  # also checked by tests/test_contract.py
    for turn in fixture["history"]:
        lines.append(f"fixture_turn {len(turn['images'])} {turn['question'].encode().hex()} "
                     f"{turn['answer'].encode().hex() or '-'}")
    question = fixture["question"]
    lines += [f"fixture_question {len(question['images'])} {question['question'].encode().hex()}",
              "fixture_ids " + " ".join(map(str, fixture["ids"]))]
    for case in golden.cases.values():
        lines += [f"case {case['name']}",
                  "images " + " ".join(case["images"]),
                  "text " + case["text"].encode("utf-8").hex(),
                  "input_ids " + " ".join(map(str, case["input_ids"])),
                  "generated_ids " + " ".join(map(str, case["generated_ids"])),
                  "generated_text " + case["generated_text"].encode("utf-8").hex(),
                  f"check_generation {int(case['name'] in GREEDY_CASES)}",
                  "end"]
    (folder / "cases.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_model_facts_data(folder: Path, golden) -> list[str]:
    """For the Java smoke test: the Python runtime's pixels under another model's mean/std (``<name>.other``) and
    of a transparent RGBA picture (``ramp.rgba``), which JNI's preprocess must reproduce."""
    side = next(iter(golden.arrays[k] for k in golden.arrays if k.startswith("pixels/"))).shape[-1]
    other = ImageSpec(side, OTHER_MEAN, OTHER_STD)
    for name, path in golden.images.items():
        with Image.open(path) as im:
            preprocess_image(im, other).astype("<f4").tofile(folder / f"{name}.other.pixels.f32")
    rgb, alpha = alpha_ramp(40, 30)
    rgba = np.ascontiguousarray(np.dstack([rgb, alpha]))
    rgba.tofile(folder / "ramp.rgba")
    spec = ImageSpec(side, contract.IMAGE_MEAN, contract.IMAGE_STD)
    preprocess_image(Image.fromarray(rgba, "RGBA"), spec).astype("<f4").tofile(folder / "ramp.rgba.pixels.f32")
    return ["other_image_mean " + " ".join(map(repr, OTHER_MEAN)), "other_image_std " + " ".join(map(repr, OTHER_STD)),
            "rgba ramp 40 30"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    """The golden tiny checkpoint's decoder as F32 GGUF, by the project's exporter."""
    return write_llm_gguf(CheckpointReader(tiny_ckpt), tmp_path_factory.mktemp("native_gguf") / "tiny-F32.gguf", "F32")


def write_pipeline_data(folder: Path, golden, bundle: Path, native_cmd: Path) -> None:
    """For the Java smoke test's device pipeline (image file -> vision -> answer through JNI): the F32 bundle's
    files, the golden image files, and for each golden case the answer ``qwenvl-native run --kv q8_0 --mmap``
    gives (JNI ``open(..., "q8_0", true)`` must give the same: the KV type and the mapping reach the core).
    Written to ``pipeline.txt``, read by NativeSmokeTest only."""
    lines = [f"bundle_vision {bundle / contract.VISION_FILE}", f"bundle_gguf {bundle / contract.LLM_FILE}"]
    lines += [f"image_file {name} {path}" for name, path in golden.images.items()]
    for name in JAVA_PIPELINE_CASES:
        c = golden.cases[name]
        proc = subprocess.run([str(native_cmd), "run", str(bundle), *(str(golden.images[i]) for i in c["images"]),
                               c["text"], "--greedy", "--max-tokens", str(golden.max_new_tokens), "--threads", "2",
                               "--ctx", "1024", "--kv", "q8_0", "--mmap"], capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()
        lines.append(f"q8_0_text {name} {proc.stdout.decode('utf-8').removesuffix(chr(10)).encode().hex()}")
    (folder / "pipeline.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")  # beside cases.txt (C++ reads that)


@pytest.fixture(scope="module")
def host_build() -> Path:
    return build_native(BUILD_ROOT / "host")


@pytest.fixture(scope="module")
def test_data(tmp_path_factory: pytest.TempPathFactory, golden, tiny_gguf: Path, tiny_ckpt: Path, f32_bundle: Path,
              host_build: Path) -> Path:
    n_embd = CheckpointReader(tiny_ckpt).config.hidden_size
    folder = write_test_data(tmp_path_factory.mktemp("native_data"), golden, tiny_gguf, n_embd)
    write_pipeline_data(folder, golden, f32_bundle, host_build / "qwenvl-native")
    return folder


# --- ctypes over the C API ------------------------------------------------------------------------

class OpenParams(ctypes.Structure):
    _fields_ = [("n_ctx", ctypes.c_int32), ("n_threads", ctypes.c_int32), ("n_batch", ctypes.c_int32),
                ("kv_type", ctypes.c_int32), ("use_mmap", ctypes.c_int32)]


class GenerateParams(ctypes.Structure):
    _fields_ = [("max_tokens", ctypes.c_int32), ("temperature", ctypes.c_float), ("top_p", ctypes.c_float),
                ("seed", ctypes.c_uint32)]


class ImageArg(ctypes.Structure):
    _fields_ = [("rows", ctypes.POINTER(ctypes.c_float)), ("n_rows", ctypes.c_int32), ("n_embd", ctypes.c_int32)]


class Result(ctypes.Structure):
    _fields_ = [("text", ctypes.c_char_p), ("text_len", ctypes.c_int32), ("tokens", ctypes.POINTER(ctypes.c_int32)),
                ("n_tokens", ctypes.c_int32), ("stop_reason", ctypes.c_int32), ("stop_token", ctypes.c_int32),
                ("n_prompt_positions", ctypes.c_int32), ("n_prompt_evaluated", ctypes.c_int32),
                ("n_past", ctypes.c_int32), ("n_turns_dropped", ctypes.c_int32), ("prefill_ms", ctypes.c_double),
                ("decode_ms", ctypes.c_double), ("decode_tokens_per_s", ctypes.c_double)]


class Info(ctypes.Structure):
    _fields_ = [("n_embd", ctypes.c_int32), ("n_ctx", ctypes.c_int32), ("n_batch", ctypes.c_int32),
                ("n_vocab", ctypes.c_int32), ("n_past", ctypes.c_int32), ("n_turns", ctypes.c_int32),
                ("n_image_rows", ctypes.c_int32), ("image_size", ctypes.c_int32), ("image_mean", ctypes.c_float * 3),
                ("image_std", ctypes.c_float * 3), ("eos_id", ctypes.c_int32), ("im_start_id", ctypes.c_int32),
                ("im_end_id", ctypes.c_int32), ("ref_start_id", ctypes.c_int32), ("image_start_id", ctypes.c_int32),
                ("image_end_id", ctypes.c_int32)]


TOKEN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p)


class NativeCore:
    """A thin ctypes face of libqwenvl_core for the parity checks (one session)."""

    def __init__(self, lib: ctypes.CDLL, gguf: Path, n_ctx: int = 1024, n_batch: int = 512):
        self.lib = lib
        self.session = ctypes.c_void_p()
        params = OpenParams(n_ctx, 2, n_batch, 0, 0)
        self._check(lib.qwenvl_open(str(gguf).encode(), ctypes.byref(params), ctypes.byref(self.session)))
        info = Info()
        self._check(lib.qwenvl_get_info(self.session, ctypes.byref(info)))
        self.n_embd = info.n_embd

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"qwenvl status {rc}: {self.lib.qwenvl_last_error().decode()}")

    def prompt_ids(self, n_images: int, question: str) -> list[int]:
        n = ctypes.c_int32()
        rc = self.lib.qwenvl_prompt_tokens(self.session, n_images, question.encode(), None, 0, ctypes.byref(n))
        assert rc in (0, -5), self.lib.qwenvl_last_error()
        ids = (ctypes.c_int32 * n.value)()
        self._check(self.lib.qwenvl_prompt_tokens(self.session, n_images, question.encode(), ids, n.value,
                                                  ctypes.byref(n)))
        return list(ids[:n.value])

    def generate(self, rows: list[np.ndarray], question: str, max_tokens: int) -> tuple[Result, list[int], str]:
        """Greedy generation; returns the result, the ids and the streamed text."""
        rows = [np.ascontiguousarray(r, dtype=np.float32) for r in rows]  # (256, n_embd) each
        images = (ImageArg * max(len(rows), 1))()
        for i, r in enumerate(rows):
            images[i] = ImageArg(r.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), r.shape[0], r.shape[1])
        streamed: list[bytes] = []

        @TOKEN_CALLBACK
        def on_token(piece, length, token, user):
            streamed.append(ctypes.string_at(piece, length))
            return 0

        params = GenerateParams(max_tokens, 0.0, 1.0, 0)
        result = Result()
        self._check(self.lib.qwenvl_generate(self.session, images, len(rows), question.encode(),
                                             ctypes.byref(params), on_token, None, ctypes.byref(result)))
        ids = [result.tokens[i] for i in range(result.n_tokens)]
        return result, ids, b"".join(streamed).decode("utf-8")

    def close(self) -> None:
        if self.session:
            self.lib.qwenvl_close(self.session)
            self.session = ctypes.c_void_p()


@pytest.fixture(scope="module")
def core_lib(host_build: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(host_build / "libqwenvl_core.so"))
    lib.qwenvl_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(OpenParams), ctypes.POINTER(ctypes.c_void_p)]
    lib.qwenvl_close.argtypes = [ctypes.c_void_p]
    lib.qwenvl_get_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(Info)]
    lib.qwenvl_prompt_tokens.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p,
                                         ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.POINTER(ctypes.c_int32)]
    lib.qwenvl_generate.argtypes = [ctypes.c_void_p, ctypes.POINTER(ImageArg), ctypes.c_int32, ctypes.c_char_p,
                                    ctypes.POINTER(GenerateParams), TOKEN_CALLBACK, ctypes.c_void_p,
                                    ctypes.POINTER(Result)]
    lib.qwenvl_last_error.restype = ctypes.c_char_p
    lib.qwenvl_set_log_level.argtypes = [ctypes.c_int]
    lib.qwenvl_set_log_level(1)
    return lib


@pytest.fixture(scope="module")
def core(core_lib: ctypes.CDLL, tiny_gguf: Path):
    native = NativeCore(core_lib, tiny_gguf, n_ctx=1024, n_batch=96)  # image rows in pieces of 96
    yield native
    native.close()


def reset(core: NativeCore) -> None:
    core._check(core.lib.qwenvl_reset(core.session))


# --- tests ----------------------------------------------------------------------------------------

def test_ctest_and_java_pass(host_build: Path, test_data: Path):
    """Every native test group and the Java smoke test (through JNI) pass on the golden data."""
    out = run_ctest(host_build, test_data)
    for name in ["core.api_errors", "core.tokenize", "core.prompt_parity", "core.generate_parity",
                 "core.chat_kv_cache", "core.preprocess", "java.smoke"]:
        assert f" {name} " in out and "Passed" in out, f"{name} missing from ctest:\n{out}"


@pytest.mark.parametrize("case", ["one_image", "two_images", "text_only", "grounding", "chinese", "injection"])
def test_prompt_ids_equal_golden(core: NativeCore, golden, case: str):
    """Catches a prompt built differently from the original (roles, newlines, tags, special-looking text)."""
    c = golden.cases[case]
    reset(core)
    assert core.prompt_ids(len(c["images"]), c["text"]) == c["input_ids"]


@pytest.mark.parametrize("case", GREEDY_CASES)
def test_greedy_ids_equal_golden(core: NativeCore, golden, case: str):
    """Catches image rows fed at wrong positions or in a wrong layout, and broken batching (n_batch 96)."""
    c = golden.cases[case]
    reset(core)
    rows = [golden.vision(name) for name in c["images"]]  # (256, 256) each
    result, ids, streamed = core.generate(rows, c["text"], golden.max_new_tokens)
    assert ids == c["generated_ids"]
    assert streamed == result.text[:result.text_len].decode("utf-8") == c["generated_text"]
    assert result.n_prompt_evaluated == len(c["input_ids"])
    assert result.prefill_ms > 0 and result.decode_tokens_per_s > 0


def test_second_turn_decodes_only_new_tokens_and_matches_llama_cpp_python(core: NativeCore, golden, tiny_gguf: Path):
    """Catches a KV cache that is rebuilt each turn, or continued at the wrong positions.

    The second turn's greedy ids must equal llama-cpp-python's on the very same prompt ids
    (text-only turns, so the reference needs no image rows).
    """
    reset(core)
    q1, q2 = golden.cases["text_only"]["text"], "Tell me more about it."
    prompt1 = core.prompt_ids(0, q1)
    first, ids1, _ = core.generate([], q1, 6)
    decoded1 = ids1 if first.stop_reason == 0 else ids1[:-1]  # the last id is not decoded without a stop token
    prompt2 = core.prompt_ids(0, q2)
    second, ids2, _ = core.generate([], q2, 6)
    reused = 0
    for have, want in zip(prompt1 + decoded1, prompt2, strict=False):
        if have != want:
            break
        reused += 1
    assert second.n_prompt_positions == len(prompt2)
    assert second.n_prompt_evaluated == len(prompt2) - reused
    assert second.n_prompt_evaluated <= len(prompt2) - len(prompt1)  # the first turn is not decoded again

    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=1024, n_threads=2, n_threads_batch=2, verbose=False)
    try:
        llm.eval(prompt2)
        expected = []
        for _ in range(len(ids2)):
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            token = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))
            if token in STOP_IDS:
                break
            expected.append(token)
            llm.eval([token])
    finally:
        llm.close()
    assert ids2 == expected


def test_other_checkpoint_sizes(core_lib: ctypes.CDLL, tmp_path: Path, odd_ckpt: Path, golden):
    """Catches sizes taken from the golden model: other head counts and layer counts, random image rows."""
    config = CheckpointReader(odd_ckpt).config
    gguf = write_llm_gguf(CheckpointReader(odd_ckpt), tmp_path / "odd-F32.gguf", "F32")
    native = NativeCore(core_lib, gguf, n_ctx=640, n_batch=128)
    try:
        assert native.n_embd == config.hidden_size
        rows = np.random.default_rng(0).standard_normal((IMAGE_ROWS, config.hidden_size)).astype(np.float32)
        question = golden.cases["one_image"]["text"]
        prompt = native.prompt_ids(1, question)
        result, ids, _ = native.generate([rows], question, 5)
        assert result.n_prompt_evaluated == len(prompt) == len(golden.cases["one_image"]["input_ids"])
        assert 1 <= len(ids) <= 5 and all(0 <= t < config.vocab_size for t in ids)
        with pytest.raises(RuntimeError, match="wide"):
            native.generate([rows[:, :-1]], question, 5)
    finally:
        native.close()


@pytest.mark.long
def test_sanitizer_build_passes(test_data: Path):
    """The native tests once more with ASan + UBSan in our code: catches memory errors the normal run hides."""
    build_dir = build_native(BUILD_ROOT / "asan", "-DQWENVL_SANITIZE=ON")
    run_ctest(build_dir, test_data)
