"""The model contract: every fact about Qwen-VL-Chat as the exporter writes it into a bundle.

One place for what the exporter writes: special token ids and names, the 256 adapter queries, the image
size and CLIP mean/std, the grounding tags, the system prompt, the generation defaults (into the
manifest's ``model`` section and, under the GGUF metadata keys ``qwenvl.*``, into ``llm.gguf``), and
the names every layer shares: bundle files, vision tensors, GGUF keys.
The runtimes read the facts back from the bundle, never from here: the Python runtime imports only the
names (tests/test_contract.py checks it; ``runtime/bundle.py`` ModelInfo holds the facts it reads), the
native core reads the GGUF (native/src/model_contract.cpp) and ``qwenvl-native`` the manifest.
This module imports nothing but the standard library: every layer may depend on it.
"""

from __future__ import annotations

from typing import Any

# --- special tokens (Qwen's tokenizer: they follow the 151643 tiktoken ranks) ------------------
EOS_ID = 151643  # <|endoftext|>
IM_START_ID = 151644  # <|im_start|>
IM_END_ID = 151645  # <|im_end|>
N_EXTRA_TOKENS = 205  # <|extra_0|> .. <|extra_204|>
REF_START_ID = 151851  # <ref>; </ref> <box> </box> <quad> </quad> follow it
IMAGE_START_ID = 151857  # <img>
IMAGE_END_ID = 151858  # </img>
IMAGE_PAD_ID = 151859  # <imgpad>: what an id list shows at image-row positions

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
GROUNDING_TAGS: tuple[str, ...] = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")
IMAGE_TAGS: tuple[str, ...] = ("<img>", "</img>", "<imgpad>")
# Every special token in id order, starting at EOS_ID.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(N_EXTRA_TOKENS)),
                                   *GROUNDING_TAGS, *IMAGE_TAGS)

# --- images ------------------------------------------------------------------------------------
N_QUERIES = 256  # the adapter's learned queries: rows per image (16 x 16)
IMAGE_SIZE = 448
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
POSITIONS_PER_IMAGE = N_QUERIES + 2  # <img> rows </img>

# --- chat ----------------------------------------------------------------------------------------
SYSTEM_PROMPT = "You are a helpful assistant."
TOP_P = 0.3  # generation_config.json of Qwen-VL-Chat
TOP_K = 0
MAX_NEW_TOKENS = 512

# --- bundle files --------------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
VISION_FILE = "vision.onnx"
LLM_FILE = "llm.gguf"
VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_embeds"

# --- GGUF metadata -------------------------------------------------------------------------------
GGUF_PREFIX = "qwenvl."
KEY_EOS_ID = "qwenvl.eos_id"
KEY_IM_START_ID = "qwenvl.im_start_id"
KEY_IM_END_ID = "qwenvl.im_end_id"
KEY_REF_START_ID = "qwenvl.ref_start_id"
KEY_IMAGE_START_ID = "qwenvl.image_start_id"
KEY_IMAGE_END_ID = "qwenvl.image_end_id"
KEY_IMAGE_PAD_ID = "qwenvl.image_pad_id"
KEY_N_QUERIES = "qwenvl.n_queries"
KEY_IMAGE_SIZE = "qwenvl.image_size"
KEY_IMAGE_MEAN = "qwenvl.image_mean"
KEY_IMAGE_STD = "qwenvl.image_std"
KEY_SYSTEM_PROMPT = "qwenvl.system_prompt"
KEY_TOP_P = "qwenvl.top_p"
KEY_TOP_K = "qwenvl.top_k"
KEY_MAX_NEW_TOKENS = "qwenvl.max_new_tokens"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"


def chat_template(system_prompt: str = SYSTEM_PROMPT) -> str:
    """ChatML as a Jinja template (llama.cpp's tools, ollama): the default system prompt when none is given."""
    default = system_prompt.replace("\\", "\\\\").replace("'", "\\'")
    return ("{% if not messages or messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n" + default + "<|im_end|>\\n' }}{% endif %}"
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def float_list(values) -> str:
    """Three floats as one GGUF string ("0.5, 0.25, 0.125"): llama.cpp's ``llama_model_meta_val_str`` hides arrays."""
    return ", ".join(repr(float(v)) for v in values)


def gguf_metadata(image_start_id: int = IMAGE_START_ID, n_queries: int = N_QUERIES, image_size: int = IMAGE_SIZE,
                  system_prompt: str = SYSTEM_PROMPT, top_p: float = TOP_P, top_k: int = TOP_K,
                  max_new_tokens: int = MAX_NEW_TOKENS, eos_id: int = EOS_ID,
                  image_mean: tuple[float, ...] = IMAGE_MEAN, image_std: tuple[float, ...] = IMAGE_STD
                  ) -> dict[str, Any]:
    """The ``qwenvl.*`` keys and their values as the exporter writes them (ints, floats, strings)."""
    return {
        KEY_EOS_ID: eos_id, KEY_IM_START_ID: IM_START_ID, KEY_IM_END_ID: IM_END_ID, KEY_REF_START_ID: REF_START_ID,
        KEY_IMAGE_START_ID: image_start_id, KEY_IMAGE_END_ID: image_start_id + 1,
        KEY_IMAGE_PAD_ID: image_start_id + 2, KEY_N_QUERIES: n_queries, KEY_IMAGE_SIZE: image_size,
        KEY_IMAGE_MEAN: float_list(image_mean), KEY_IMAGE_STD: float_list(image_std), KEY_SYSTEM_PROMPT: system_prompt,
        KEY_TOP_P: float(top_p), KEY_TOP_K: top_k, KEY_MAX_NEW_TOKENS: max_new_tokens,
    }
