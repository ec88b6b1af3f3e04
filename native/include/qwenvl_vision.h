/*
 * qwenvl_vision.h - the vision step in C: the bundle's vision.onnx (vision encoder + adapter, FP32 or
 * INT8) run by ONNX Runtime's C API, pixels in, image rows out.
 *
 * Compiled into libqwenvl_core when CMake found an ONNX Runtime library (QWENVL_HAVE_VISION is then
 * defined for users of the target); without it these functions still exist and fail with
 * QWENVL_ERR_MODEL_LOAD and "built without ONNX Runtime".
 *
 *   pixels  float32 [3, S, S] from qwenvl_preprocess_image (S = info.image_size)
 *   rows    float32 [n_rows, n_embd] for qwenvl_generate's qwenvl_image (n_rows 256)
 *
 * ONNX Runtime must provide C API version 32 (ONNX Runtime 1.32.0 or newer); an older library is
 * refused at open with one line naming its version. Same conventions as qwenvl_core.h: status codes,
 * qwenvl_last_error(). Free the vision session (qwenvl_vision_close) before opening the decoder on a
 * small device: the two then never share memory.
 */
#ifndef QWENVL_VISION_H
#define QWENVL_VISION_H

#include <stdint.h>

#include "qwenvl_core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qwenvl_vision qwenvl_vision;

typedef struct qwenvl_vision_info {
    int32_t image_size; /* S: the graph's input side */
    int32_t n_rows;     /* rows per image (256) */
    int32_t n_embd;     /* row width (the decoder's embedding size) */
} qwenvl_vision_info;

/* Load vision.onnx on the CPU; n_threads 0: ONNX Runtime's default (one per physical core). The graph
 * must be pixel_values float [N, 3, S, S] -> image_embeds float [N, rows, hidden]. */
QWENVL_API int qwenvl_vision_open(const char* onnx_path, int32_t n_threads, qwenvl_vision** out_vision);

QWENVL_API int qwenvl_vision_get_info(const qwenvl_vision* vision, qwenvl_vision_info* out_info);

/* One image: pixels [3, S, S] -> out_rows [n_rows * n_embd] (the caller's array). */
QWENVL_API int qwenvl_vision_encode(qwenvl_vision* vision, const float* pixels, float* out_rows);

/* Free the session and ONNX Runtime's memory for it. NULL is allowed. */
QWENVL_API int qwenvl_vision_close(qwenvl_vision* vision);

/* The version string of the ONNX Runtime the core runs ("1.32.0"), or NULL (qwenvl_last_error says
 * why) when the core was built without it or the library provides no C API version 32. */
QWENVL_API const char* qwenvl_vision_runtime_version(void);

#ifdef __cplusplus
}
#endif

#endif /* QWENVL_VISION_H */
