/*
 * qwenvl_core.h - Qwen-VL-Chat's decoder side in C: the chat prompt, image rows and llama.cpp.
 *
 * This is what the Python runtime does on the llama.cpp side, for apps without Python (Android):
 *   - open a Qwen-VL decoder GGUF (written by `qwenvl-edge export`) into a llama.cpp context;
 *   - build the Qwen-VL chat prompt (SPEC "Chat format"):
 *       <|im_start|>system\nSYSTEM PROMPT (qwenvl.system_prompt)<|im_end|>\n
 *       <|im_start|>user\nPicture 1: <img>[256 image rows]</img>\nQUESTION<|im_end|>\n
 *       <|im_start|>assistant\n
 *     In the question only the grounding tags <ref> </ref> <box> </box> <quad> </quad> are special
 *     tokens; everything else, `<img>` or `<|im_end|>` typed by a user included, is plain text.
 *   - feed the image rows (the vision encoder's output, computed elsewhere, e.g. onnxruntime) at the
 *     256 positions between <img> and </img>, in batches of at most n_batch positions;
 *   - generate (greedy, or temperature + top-p) with a per-token callback, stopping at <|im_end|>,
 *     <|im_start|> or <|endoftext|>;
 *   - keep the chat: every turn builds the whole prompt (system, the newest earlier turns that
 *     fit, the new question; earlier answers as text) exactly as the Python runtime does, keeps
 *     the longest prefix the KV cache already holds and decodes only the rest, so a follow-up
 *     question evaluates only its own tokens.
 *
 * Conventions
 *   - Every function returns QWENVL_OK (0) or a negative qwenvl_status; on failure
 *     qwenvl_last_error() gives a one-line message naming the offending value. Bad input (NULL
 *     pointers, wrong sizes, a missing file, a prompt too long for the context) is an error, never
 *     a crash; a failed call leaves the session as it was, except QWENVL_ERR_DECODE (chat reset).
 *   - Strings are UTF-8, NUL-terminated.
 *   - A session is used by one thread at a time; different sessions may run on different threads.
 *     The token callback must not call back into the same session.
 *   - Above 2048 positions the original model scales queries (logn) and its rotary base (dynamic
 *     NTK); llama.cpp's Qwen graph does neither, so results match the original within 2048 positions.
 */
#ifndef QWENVL_CORE_H
#define QWENVL_CORE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define QWENVL_API __declspec(dllexport)
#else
#define QWENVL_API __attribute__((visibility("default")))
#endif

/* The model's facts (special ids, rows per image, image size, mean/std, system prompt) are not
 * compiled in: the core reads them from the GGUF's qwenvl.* metadata (qwenvl_edge/contract.py writes
 * them) and qwenvl_get_info reports them. */
#define QWENVL_IMAGE_POSITION (-1) /* qwenvl_prompt_tokens: a position that holds an image row */

typedef enum qwenvl_status {
    QWENVL_OK = 0,
    QWENVL_ERR_INVALID_ARGUMENT = -1, /* NULL pointer, wrong size, out-of-range option, bad UTF-8 */
    QWENVL_ERR_MODEL_LOAD = -2,       /* GGUF missing, unreadable, or not a Qwen-VL decoder */
    QWENVL_ERR_CONTEXT_FULL = -3,     /* the prompt (tokens + image rows) does not fit n_ctx */
    QWENVL_ERR_DECODE = -4,           /* llama_decode failed; the chat was reset */
    QWENVL_ERR_BUFFER_TOO_SMALL = -5, /* an output array is too small; the size needed is reported */
    QWENVL_ERR_OUT_OF_MEMORY = -6,
    QWENVL_ERR_INTERNAL = -7
} qwenvl_status;

typedef enum qwenvl_stop_reason {
    QWENVL_STOP_TOKEN = 0,        /* the model wrote <|im_end|>, <|im_start|> or <|endoftext|> */
    QWENVL_STOP_MAX_TOKENS = 1,   /* max_tokens were generated */
    QWENVL_STOP_CALLBACK = 2,     /* the token callback returned non-zero */
    QWENVL_STOP_CONTEXT_FULL = 3  /* no position left in the context */
} qwenvl_stop_reason;

/* One open model + llama.cpp context + chat state. Opaque. */
typedef struct qwenvl_session qwenvl_session;

/* KV cache element types (qwenvl_open_params.kv_type). */
#define QWENVL_KV_F16 0  /* 16-bit K and V, flash attention off: exactly as the Python runtime */
#define QWENVL_KV_Q8_0 1 /* 8-bit K and V (half the KV memory: 0.53 GB instead of 1 GB for Qwen-7B at 2048
                            positions); turns flash attention on, which llama.cpp needs for a quantized V */

typedef struct qwenvl_open_params {
    int32_t n_ctx;     /* context positions (tokens + image rows); default 2048 (the model's seq_length) */
    int32_t n_threads; /* CPU threads; 0 = all cores */
    int32_t n_batch;   /* most positions per llama_decode call; default 512 */
    int32_t kv_type;   /* QWENVL_KV_F16 (default) or QWENVL_KV_Q8_0 */
    int32_t use_mmap;  /* 0 (default, as the Python runtime): read the weights into memory, where llama.cpp
                          repacks them for the CPU's fastest kernels (Q4_0 on ARM: dot-product/i8mm);
                          1: map the GGUF and use it as it is (no repacking: a mapping plus repacked
                          copies would count the weights twice); the weights then stay clean file
                          pages the OS can drop and re-read under memory pressure */
} qwenvl_open_params;

typedef struct qwenvl_generate_params {
    int32_t max_tokens; /* most tokens to generate; default 512 */
    float temperature;  /* <= 0: greedy (argmax); default 1.0 */
    float top_p;        /* nucleus mass in [0, 1] (at least one token kept); 1 = off; default 0.3 */
    uint32_t seed;      /* sampling seed; default 0 (as the Python runtime) */
} qwenvl_generate_params;

/* The image rows of one image: the vision encoder + adapter output, float32 [n_rows, n_embd]
 * row-major. n_rows must be qwenvl_info.n_image_rows and n_embd the model's embedding size. */
typedef struct qwenvl_image {
    const float* rows;
    int32_t n_rows;
    int32_t n_embd;
} qwenvl_image;

/* What one qwenvl_generate call did. Pointers are owned by the session and stay valid until the
 * next qwenvl_generate, qwenvl_reset or qwenvl_close on it. */
typedef struct qwenvl_result {
    const char* text;           /* the reply, valid UTF-8, NUL-terminated; grounding tags spelled out */
    int32_t text_len;           /* bytes in text, without the NUL */
    const int32_t* tokens;      /* the generated ids (the stop token excluded) */
    int32_t n_tokens;
    int32_t stop_reason;        /* a qwenvl_stop_reason */
    int32_t stop_token;         /* the stop id when stop_reason is QWENVL_STOP_TOKEN, else -1 */
    int32_t n_prompt_positions; /* positions of the whole prompt (tokens + image rows) */
    int32_t n_prompt_evaluated; /* of those, decoded by this call (the rest was in the KV cache) */
    int32_t n_past;             /* positions in the KV cache after the call */
    int32_t n_turns_dropped;    /* earlier turns left out of the prompt to make it fit */
    double prefill_ms;          /* wall time to decode the prompt */
    double decode_ms;           /* wall time to sample and decode the reply */
    double decode_tokens_per_s; /* n_tokens / decode_ms; 0 when nothing was generated */
} qwenvl_result;

/* Called once per generated token with its text, valid UTF-8 (piece is NUL-terminated too). The
 * bytes of a character split across tokens are held back and sent with the token that completes
 * it (so a piece may be empty); bytes that form no character become U+FFFD, as the Python
 * runtime's decoder (errors="replace") does. If generation ends inside a character, one last
 * call with token -1 brings U+FFFD. Return 0 to go on, non-zero to stop after this token. */
typedef int (*qwenvl_token_callback)(const char* piece, int32_t piece_len, int32_t token, void* user_data);

/* Defaults: n_ctx 2048, n_threads 0 (the cores this process may run on), n_batch 512, kv_type
 * QWENVL_KV_F16, use_mmap 0. */
QWENVL_API qwenvl_open_params qwenvl_open_default_params(void);

/* What n_threads 0 means: the cores this process may run on (its affinity mask, where the OS has one). */
QWENVL_API int32_t qwenvl_default_threads(void);

/* Defaults: max_tokens 512, temperature 1.0, top_p 0.3, seed 0. */
QWENVL_API qwenvl_generate_params qwenvl_generate_default_params(void);

/* Load gguf_path and create a context. params NULL: defaults. On success *out_session is set
 * (free it with qwenvl_close); on failure it is set to NULL. */
QWENVL_API int qwenvl_open(const char* gguf_path, const qwenvl_open_params* params, qwenvl_session** out_session);

/* Free the session and everything it owns. NULL is allowed (does nothing). */
QWENVL_API int qwenvl_close(qwenvl_session* session);

/* Sizes of an open session. */
typedef struct qwenvl_info {
    int32_t n_embd;  /* width of an image row (the decoder's input embedding size) */
    int32_t n_ctx;   /* context positions */
    int32_t n_batch; /* positions per llama_decode call */
    int32_t n_vocab;
    int32_t n_past;  /* positions in the KV cache now */
    int32_t n_turns; /* finished turns kept in the chat */
    /* the model contract, from the GGUF's qwenvl.* keys */
    int32_t n_image_rows;   /* rows (positions) per image: qwenvl.n_queries */
    int32_t image_size;     /* the vision input side S */
    float image_mean[3];    /* CLIP mean/std for qwenvl_preprocess_image */
    float image_std[3];
    int32_t eos_id;         /* <|endoftext|> */
    int32_t im_start_id;    /* <|im_start|> */
    int32_t im_end_id;      /* <|im_end|> */
    int32_t ref_start_id;   /* <ref>; </ref> <box> </box> <quad> </quad> follow */
    int32_t image_start_id; /* <img> */
    int32_t image_end_id;   /* </img> */
} qwenvl_info;

QWENVL_API int qwenvl_get_info(const qwenvl_session* session, qwenvl_info* out_info);

/* User text -> ids, as the Python runtime tokenizes a question: grounding tags are special tokens,
 * the rest plain text. Writes at most `capacity` ids; *out_n gets the count (on
 * QWENVL_ERR_BUFFER_TOO_SMALL, the capacity needed). */
QWENVL_API int qwenvl_tokenize(const qwenvl_session* session, const char* text, int32_t* out_ids,
                               int32_t capacity, int32_t* out_n);

/* The whole prompt the next qwenvl_generate(session, n_images images, question) would build, with
 * QWENVL_IMAGE_POSITION (-1) at image-row positions: the system message, the earlier turns of the
 * chat that fit (n_ctx - 1 positions; one is kept for the reply), the question. Same size
 * conventions as qwenvl_tokenize. Changes nothing. */
QWENVL_API int qwenvl_prompt_tokens(const qwenvl_session* session, int32_t n_images, const char* question,
                                    int32_t* out_ids, int32_t capacity, int32_t* out_n);

/* Ask `question` about `n_images` images (images may be NULL when n_images is 0) and generate the
 * reply; the turn joins the chat. The rows are copied (a later prompt may decode them again).
 * params NULL: defaults. callback may be NULL. out_result may be NULL. */
QWENVL_API int qwenvl_generate(qwenvl_session* session, const qwenvl_image* images, int32_t n_images,
                               const char* question, const qwenvl_generate_params* params,
                               qwenvl_token_callback callback, void* user_data, qwenvl_result* out_result);

/* Append a finished turn (question, its images, the answer) to the chat without generating: a saved
 * conversation is resumed this way. Nothing is decoded now; the next qwenvl_generate decodes what the
 * KV cache does not hold. Same checks as qwenvl_generate; answer must be valid UTF-8. */
QWENVL_API int qwenvl_add_turn(qwenvl_session* session, const qwenvl_image* images, int32_t n_images,
                               const char* question, const char* answer);

/* Forget the chat: clear the KV cache and the turns (and the image rows they kept). */
QWENVL_API int qwenvl_reset(qwenvl_session* session);

/* The message of the last failed qwenvl_* call on this thread ("" after a successful one). Valid
 * until the next qwenvl_* call on this thread. Never NULL. */
QWENVL_API const char* qwenvl_last_error(void);

/* A short name for a qwenvl_status ("invalid argument", ...). Never NULL. */
QWENVL_API const char* qwenvl_status_string(int status);

/* llama.cpp's log messages at or above `level` go to stderr: 0 none, 1 errors, 2 warnings
 * (default), 3 info, 4 debug. Global: llama.cpp has one logger per process. */
QWENVL_API int qwenvl_set_log_level(int level);

#ifdef __cplusplus
}
#endif

#endif /* QWENVL_CORE_H */
