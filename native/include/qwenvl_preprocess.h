/*
 * qwenvl_preprocess.h - Qwen-VL image preprocessing, bit-identical to the Python runtime.
 *
 * The Python runtime (runtime/preprocess.py) does, with Pillow and numpy:
 *   flatten_on_white(image)                     RGBA: composited onto white (c*a + 255*(255-a) + 127) / 255
 *   image.resize((S, S), Image.BICUBIC)         squash, no crop; Pillow's antialiased bicubic
 *   x = np.asarray(image, float32) / 255
 *   (x - mean) / std                            float32, the bundle's mean/std, laid out [3, S, S]
 * This file does the same arithmetic in C so that a phone gets the vision encoder the very same
 * input as the desktop: the resized uint8 pixels equal Pillow's bit for bit, and the float
 * output equals the float32 formula above bit for bit.
 *
 * Plain C header: usable from C, C++ and JNI code. Thread-safe: no global state.
 */
#ifndef QWENVL_PREPROCESS_H
#define QWENVL_PREPROCESS_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define QWENVL_PREPROCESS_API __declspec(dllexport)
#else
#define QWENVL_PREPROCESS_API __attribute__((visibility("default")))
#endif

/* Return codes (0 is success). */
#define QWENVL_PREPROCESS_OK 0
#define QWENVL_PREPROCESS_ERR_NULL (-1)        /* a pointer argument is NULL */
#define QWENVL_PREPROCESS_ERR_SIZE (-2)        /* width, height or an output size is <= 0 */
#define QWENVL_PREPROCESS_ERR_CHANNELS (-3)    /* channels is not 3 (RGB) or 4 (RGBA) */
#define QWENVL_PREPROCESS_ERR_TOO_LARGE (-4)   /* a size is over the limits below */
#define QWENVL_PREPROCESS_ERR_NO_MEMORY (-5)   /* a work buffer could not be allocated */
#define QWENVL_PREPROCESS_ERR_NORM (-6)        /* mean/std not finite, or a std not above 0 */

/* Limits: larger inputs are rejected with QWENVL_PREPROCESS_ERR_TOO_LARGE. */
#define QWENVL_PREPROCESS_MAX_SIDE 65535           /* input width or height */
#define QWENVL_PREPROCESS_MAX_PIXELS 178956970LL   /* width * height: Pillow's decompression-bomb error limit */
#define QWENVL_PREPROCESS_MAX_OUTPUT_SIDE 8192     /* image_size, out_width, out_height */

/*
 * Preprocess one image for the vision encoder.
 *   pixels:     row-major HWC, 8 bits per channel, `channels` 3 (RGB) or 4 (RGBA, not premultiplied:
 *               composited onto white, as a browser shows a transparent image),
 *               rows packed (stride width * channels bytes).
 *   image_size: the model's input side S (qwenvl_info.image_size, from the GGUF's qwenvl.image_size).
 *   mean, std:  three floats each, the model's normalisation (qwenvl_info.image_mean / image_std).
 *   out:        float32 [3, S, S] (channel-major), (x / 255 - mean) / std per channel.
 * Returns QWENVL_PREPROCESS_OK or a negative QWENVL_PREPROCESS_ERR_* code (out untouched then).
 */
QWENVL_PREPROCESS_API int qwenvl_preprocess_image(const unsigned char* pixels, int width, int height,
                                                  int channels, int image_size, const float* mean,
                                                  const float* std, float* out);

/*
 * The uint8 stage alone: Pillow's flatten_on_white(image).resize((out_width, out_height), BICUBIC), with
 * flatten_on_white the runtime's (runtime/preprocess.py).
 *   out: uint8 RGB [out_height, out_width, 3], row-major HWC.
 * Same return codes as qwenvl_preprocess_image.
 */
QWENVL_PREPROCESS_API int qwenvl_resize_bicubic_u8(const unsigned char* pixels, int width, int height,
                                                   int channels, int out_width, int out_height,
                                                   unsigned char* out);

/* A one-line English description of a return code ("unknown error code" for others). Never NULL. */
QWENVL_PREPROCESS_API const char* qwenvl_preprocess_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* QWENVL_PREPROCESS_H */
