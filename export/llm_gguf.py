"""The checkpoint's language model -> one GGUF file that llama.cpp loads as its ``qwen`` architecture.

llama.cpp's own converter refuses Qwen-VL checkpoints (and forgets the RMS epsilon that its
``qwen`` loader requires), so this writes the file with gguf-py's ``GGUFWriter`` directly:
hyperparameters from config.json, the tokenizer from ``qwen.tiktoken`` (see gguf_vocab.py),
and the tensors streamed one at a time from the memory-mapped checkpoint, so a 7.7 B model
(15 GB in F16) is never held in memory; only the tensor being written is.

llama.cpp's ``qwen`` graph has neither logn attention scaling nor dynamic NTK, so the file
matches the original model only within ``seq_length`` (2048) positions: that is the
context length we write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from qwenvl_edge import contract
from qwenvl_edge.errors import CheckpointError, QwenVLError
from qwenvl_edge.export.checkpoint import CheckpointReader
from qwenvl_edge.export.config import QwenConfig
from qwenvl_edge.export.gguf_vocab import add_vocab, build_gguf_vocab
from qwenvl_edge.export.tensor_record import TensorRecord, bf16_bits_to_f32, f32_to_bf16_bits

log = logging.getLogger(__name__)

ARCH = gguf.MODEL_ARCH.QWEN
VISUAL_PREFIX = "transformer.visual."  # everything else in the checkpoint is the LLM
CHUNK_ELEMENTS = 1 << 22  # elements converted at a time (16 MB of float32)
F16_MAX = float(np.finfo(np.float16).max)  # bf16 checkpoints can hold larger values than F16 can
MODEL_NAME = "Qwen-VL-Chat LLM"
DESCRIPTION = ("Qwen-VL-Chat language model (qwenvl-edge). llama.cpp has no logn attention or dynamic NTK: "
               "outputs match the original only within context_length positions.")


@dataclass(frozen=True)
class OutType:
    """One float output type: what the header says, and how 2-D weights are stored."""

    file_type: gguf.LlamaFileType
    matrix_type: gguf.GGMLQuantizationType
    numpy_dtype: type


OUT_TYPES: dict[str, OutType] = {
    "F32": OutType(gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32, np.float32),
    "F16": OutType(gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16, np.float16),
    "BF16": OutType(gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16, np.uint16),
}

# What llama.cpp's qwen loader creates (llama_model_qwen::load_arch_tensors): the cross-check
# that the name map produced every tensor the loader will ask for, and nothing else.
GLOBAL_TENSORS = {gguf.MODEL_TENSOR.TOKEN_EMBD: ("weight",), gguf.MODEL_TENSOR.OUTPUT_NORM: ("weight",),
                  gguf.MODEL_TENSOR.OUTPUT: ("weight",)}
LAYER_TENSORS = {gguf.MODEL_TENSOR.ATTN_NORM: ("weight",), gguf.MODEL_TENSOR.ATTN_QKV: ("weight", "bias"),
                 gguf.MODEL_TENSOR.ATTN_OUT: ("weight",), gguf.MODEL_TENSOR.FFN_NORM: ("weight",),
                 gguf.MODEL_TENSOR.FFN_GATE: ("weight",), gguf.MODEL_TENSOR.FFN_UP: ("weight",),
                 gguf.MODEL_TENSOR.FFN_DOWN: ("weight",)}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PlannedTensor:
    """One checkpoint tensor and where it goes in the GGUF file."""

    source: str  # checkpoint name
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order ([out, in]); GGUF stores it reversed, as llama.cpp expects
    ggml_type: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (4 if self.ggml_type == gguf.GGMLQuantizationType.F32 else 2)


def llm_tensor_names(reader: CheckpointReader) -> list[str]:
    """Every language-model tensor of the architecture (the checkpoint minus the vision tower)."""
    return [n for n in reader.names() if not n.startswith(VISUAL_PREFIX)]


def expected_gguf_names(n_layer: int) -> set[str]:
    names = {f"{gguf.TENSOR_NAMES[t]}.{s}" for t, suffixes in GLOBAL_TENSORS.items() for s in suffixes}
    names |= {f"{gguf.TENSOR_NAMES[t].format(bid=i)}.{s}"
              for i in range(n_layer) for t, suffixes in LAYER_TENSORS.items() for s in suffixes}
    return names


def plan_tensors(reader: CheckpointReader, out: OutType) -> list[PlannedTensor]:
    """Checkpoint names -> GGUF names and types; 1-D tensors (norms, qkv bias) stay F32 as llama.cpp keeps them."""
    n_layer = reader.config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(ARCH, n_layer)
    plan = []
    for source in llm_tensor_names(reader):
        name = name_map.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"{reader.folder}: tensor {source} has no GGUF name for arch qwen")
        shape = reader.record(source).shape
        ggml_type = out.matrix_type if len(shape) == 2 else gguf.GGMLQuantizationType.F32
        plan.append(PlannedTensor(source, name, shape, ggml_type))
    made = Counter(t.name for t in plan)
    expected = expected_gguf_names(n_layer)
    if set(made) != expected or max(made.values()) > 1:
        wrong = sorted((set(made) ^ expected) | {n for n, c in made.items() if c > 1})
        raise CheckpointError(f"{reader.folder}: LLM tensors do not map onto the qwen layout: {', '.join(wrong)}")
    return plan


def add_hparams(writer: gguf.GGUFWriter, cfg: QwenConfig, out: OutType) -> None:
    """The ``qwen.*`` keys. ``feed_forward_length`` is the full intermediate_size: the loader halves it."""
    writer.add_name(MODEL_NAME)
    writer.add_description(DESCRIPTION)
    writer.add_file_type(out.file_type)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.seq_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    writer.add_rope_dimension_count(int(cfg.head_dim * cfg.rotary_pct))
    writer.add_rope_freq_base(float(cfg.rotary_emb_base))


def add_contract(writer: gguf.GGUFWriter, reader: CheckpointReader) -> None:
    """The ``qwenvl.*`` keys (special ids, image facts, system prompt, generation defaults) and a ChatML
    ``tokenizer.chat_template``: the native core reads the contract from here, llama.cpp's tools chat with it."""
    cfg = reader.config
    gen_path = reader.folder / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    facts = contract.gguf_metadata(
        image_start_id=cfg.visual.image_start_id, n_queries=cfg.visual.n_queries, image_size=cfg.visual.image_size,
        top_p=float(gen.get("top_p", contract.TOP_P)), top_k=int(gen.get("top_k", contract.TOP_K)),
        max_new_tokens=int(gen.get("max_new_tokens", contract.MAX_NEW_TOKENS)),
        eos_id=int(gen.get("eos_token_id", contract.EOS_ID)))
    for key, value in facts.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_chat_template(contract.chat_template(contract.SYSTEM_PROMPT))


def _raw_to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_bits_to_f32(raw) if dtype == "BF16" else raw.astype(np.float32)


def convert_tensor(record: TensorRecord, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    """The tensor in its output type, converted in chunks so no whole-tensor float32 copy is made."""
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return record.f32()
    raw = record.raw()
    if ggml_type == gguf.GGMLQuantizationType.BF16 and record.dtype == "BF16":
        return np.array(raw, dtype=np.uint16)  # exact: the checkpoint's own bits
    out = np.empty(record.shape, dtype=np.float16 if ggml_type == gguf.GGMLQuantizationType.F16 else np.uint16)
    src, dst = raw.reshape(-1), out.reshape(-1)
    for i in range(0, src.size, CHUNK_ELEMENTS):
        chunk = _raw_to_f32(src[i:i + CHUNK_ELEMENTS], record.dtype)
        if out.dtype == np.float16:
            if np.abs(chunk).max(initial=0.0) > F16_MAX:
                raise CheckpointError(f"{record.path}: tensor {record.name} has values beyond float16's range "
                                      f"(±{F16_MAX:.0f}): write BF16 or F32 instead")
            dst[i:i + CHUNK_ELEMENTS] = chunk.astype(np.float16)
        else:
            dst[i:i + CHUNK_ELEMENTS] = f32_to_bf16_bits(chunk)
    return out


def _check_disk_space(folder: Path, nbytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise QwenVLError(f"{folder}: {free / 2**30:.1f} GiB free, the GGUF file needs {nbytes / 2**30:.1f} GiB")


def write_llm_gguf(reader: CheckpointReader, out_path: Path, out_type: str = "F16",
                   progress: Progress | None = None) -> Path:
    """Write the LLM of ``reader`` to ``out_path`` (F32 | F16 | BF16), tokenizer included; return the path.

    The file appears under its name only when complete (written as a hidden ``.partial`` beside it).
    """
    if out_type not in OUT_TYPES:
        raise QwenVLError(f"unknown GGUF output type {out_type!r}; choose {', '.join(OUT_TYPES)}")
    out = OUT_TYPES[out_type]
    cfg = reader.config
    out_path = Path(out_path)
    say = progress or (lambda _msg: None)

    t0 = time.perf_counter()
    vocab = build_gguf_vocab(reader.tiktoken_path, cfg.vocab_size)
    if vocab.special_ids["<img>"] != cfg.visual.image_start_id:
        raise CheckpointError(f"config.json visual.image_start_id {cfg.visual.image_start_id} is not the "
                              f"tokenizer's <img> id {vocab.special_ids['<img>']}")
    say(f"vocabulary: {len(vocab.tokens)} tokens, {len(vocab.merges)} merges ({time.perf_counter() - t0:.1f} s)")

    plan = plan_tensors(reader, out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _check_disk_space(out_path.parent, sum(t.nbytes for t in plan) + 64 * 2**20)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH])
    try:
        add_hparams(writer, cfg, out)
        add_vocab(writer, vocab)
        add_contract(writer, reader)
        for t in plan:
            np_dtype = np.float32 if t.ggml_type == gguf.GGMLQuantizationType.F32 else out.numpy_dtype
            writer.add_tensor_info(t.name, t.shape, np.dtype(np_dtype), t.nbytes, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        consumed: list[str] = []
        for i, t in enumerate(plan, 1):
            data = convert_tensor(reader.record(t.source), t.ggml_type)
            writer.write_tensor_data(data)
            consumed.append(t.source)
            del data
            say(f"[{i}/{len(plan)}] {t.source} -> {t.name} {t.ggml_type.name} {list(t.shape)}")
        writer.close()
        if Counter(consumed) != Counter(llm_tensor_names(reader)):
            raise CheckpointError(f"{reader.folder}: LLM tensors not written exactly once")
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    size = out_path.stat().st_size
    say(f"wrote {out_path.name}: {out_type}, {size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s")
    return out_path
