// image_preprocess.cpp - Pillow-exact bicubic resize + CLIP normalisation (see qwenvl_preprocess.h).
//
// Why bit-exact: the vision encoder was validated on the Python runtime's pixels (Pillow). Any
// one-level difference in a resized pixel moves the image embeddings a little, and on quantized
// models that is enough to flip a greedy token. So this file redoes Pillow's arithmetic step by
// step (libImaging/Resample.c, 8 bits per channel), written independently:
//   * separable, two passes: horizontal (only over the source rows the vertical pass will read),
//     then vertical; or, as Pillow >= 13 does when the height shrinks by more than twice as many
//     pixels as the width, vertical first; a pass whose size does not change is skipped;
//   * per output sample: centre = (i + 0.5) * scale, support = 2 * max(scale, 1) (antialiasing
//     when shrinking), taps from round(centre - support) to round(centre + support) clamped to
//     the image, weight = bicubic((j - centre + 0.5) / max(scale, 1)) with a = -0.5, weights
//     divided by their sum, then rounded half away from zero to fixed point with 22 fraction bits;
//   * accumulation in int32 starting at one half (1 << 21), result = clamp(acc >> 22, 0, 255).
// All coefficient maths is IEEE double with one rounding per operation, in Pillow's order.

#include "qwenvl_preprocess.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <vector>

// Fused multiply-add would round the coefficient maths differently from Pillow's x86-64 build
// (plain mul + add). clang (the Android NDK) contracts by default, GCC does on FMA targets.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // 22 fraction bits: 8 for the pixel, 2 spare for overshoot
constexpr double kBicubicSupport = 2.0;
constexpr int kOutChannels = 3;


// Keys' cubic convolution kernel with a = -0.5 (Pillow's BICUBIC), evaluated as Pillow does.
double bicubic_kernel(double x) {
    constexpr double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

// The taps of a 1-D resampling from in_size to out_size samples, in fixed point.
struct ResampleTaps {
    int ksize = 0;                  // weights reserved per output sample
    std::vector<int> first;         // (out_size,) first input sample read
    std::vector<int> count;         // (out_size,) number of input samples read
    std::vector<int32_t> weights;   // (out_size, ksize) fixed-point weights, zero past count
};

ResampleTaps compute_taps(int in_size, int out_size) {
    // Pillow passes the box edges as float: (float)in_size - 0.0f, exact for sizes < 2^24.
    const double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
    const double filter_scale = scale < 1.0 ? 1.0 : scale;
    const double support = kBicubicSupport * filter_scale;
    const double inv_filter_scale = 1.0 / filter_scale;

    ResampleTaps taps;
    taps.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    taps.first.resize(out_size);
    taps.count.resize(out_size);
    taps.weights.assign(static_cast<size_t>(out_size) * taps.ksize, 0);
    std::vector<double> w(taps.ksize);
    const double one = static_cast<double>(1 << kPrecisionBits);

    for (int i = 0; i < out_size; ++i) {
        const double centre = (i + 0.5) * scale;  // + box origin 0
        int lo = static_cast<int>(centre - support + 0.5);
        if (lo < 0) lo = 0;
        int hi = static_cast<int>(centre + support + 0.5);
        if (hi > in_size) hi = in_size;
        const int n = hi - lo;

        double total = 0.0;
        for (int t = 0; t < n; ++t) {
            w[t] = bicubic_kernel((t + lo - centre + 0.5) * inv_filter_scale);
            total += w[t];
        }
        int32_t* fixed = &taps.weights[static_cast<size_t>(i) * taps.ksize];
        for (int t = 0; t < n; ++t) {
            const double normalised = total != 0.0 ? w[t] / total : w[t];
            fixed[t] = normalised < 0 ? static_cast<int32_t>(-0.5 + normalised * one)
                                      : static_cast<int32_t>(0.5 + normalised * one);
        }
        taps.first[i] = lo;
        taps.count[i] = n;
    }
    return taps;
}

// Fixed-point accumulator -> uint8, like Pillow's clip8 (arithmetic shift, then clamp).
inline uint8_t clip_fixed(int32_t acc) {
    const int32_t v = acc >> kPrecisionBits;
    return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// A read-only view of interleaved 8-bit pixels; only the first 3 channels are read.
struct PixelView {
    const uint8_t* data;
    int width;
    int height;
    int channels;  // bytes per pixel (3 or 4)
    const uint8_t* row(int y) const { return data + static_cast<size_t>(y) * width * channels; }
};

// Horizontal pass over source rows [row_begin, row_end): writes RGB rows of out_width pixels.
void resample_horizontal(const PixelView& src, int row_begin, int row_end, const ResampleTaps& taps,
                         int out_width, uint8_t* out) {
    for (int y = row_begin; y < row_end; ++y) {
        const uint8_t* in_row = src.row(y);
        uint8_t* out_row = out + static_cast<size_t>(y - row_begin) * out_width * kOutChannels;
        for (int x = 0; x < out_width; ++x) {
            const int32_t* w = &taps.weights[static_cast<size_t>(x) * taps.ksize];
            const uint8_t* p = in_row + static_cast<size_t>(taps.first[x]) * src.channels;
            int32_t acc0 = 1 << (kPrecisionBits - 1), acc1 = acc0, acc2 = acc0;
            for (int t = 0; t < taps.count[x]; ++t, p += src.channels) {
                acc0 += p[0] * w[t];
                acc1 += p[1] * w[t];
                acc2 += p[2] * w[t];
            }
            out_row[x * 3 + 0] = clip_fixed(acc0);
            out_row[x * 3 + 1] = clip_fixed(acc1);
            out_row[x * 3 + 2] = clip_fixed(acc2);
        }
    }
}

// Vertical pass: src rows are indexed from row_offset (the first row the horizontal pass kept).
// The sum per pixel is taken tap by tap across the whole row; integer sums are exact, so the
// order does not change the result, only the memory access pattern.
void resample_vertical(const PixelView& src, int row_offset, const ResampleTaps& taps, int out_height,
                       uint8_t* out) {
    const int n_values = src.width * kOutChannels;
    std::vector<int32_t> acc(n_values);
    for (int y = 0; y < out_height; ++y) {
        std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
        const int32_t* w = &taps.weights[static_cast<size_t>(y) * taps.ksize];
        for (int t = 0; t < taps.count[y]; ++t) {
            const uint8_t* in_row = src.row(taps.first[y] - row_offset + t);
            const int32_t wt = w[t];
            for (int x = 0; x < src.width; ++x) {
                const uint8_t* p = in_row + static_cast<size_t>(x) * src.channels;
                acc[x * 3 + 0] += p[0] * wt;
                acc[x * 3 + 1] += p[1] * wt;
                acc[x * 3 + 2] += p[2] * wt;
            }
        }
        uint8_t* out_row = out + static_cast<size_t>(y) * n_values;
        for (int i = 0; i < n_values; ++i) out_row[i] = clip_fixed(acc[i]);
    }
}

// RGBA composited onto white, (c * a + 255 * (255 - a) + 127) / 255 in integers: the Python runtime's
// flatten_on_white (runtime/preprocess.py), so a transparent image is what a browser shows, not black.
void flatten_on_white(const PixelView& src, uint8_t* out) {
    const size_t n = static_cast<size_t>(src.width) * src.height;
    for (size_t i = 0; i < n; ++i) {
        const uint8_t* p = src.data + i * src.channels;
        const unsigned a = p[3];
        for (int c = 0; c < kOutChannels; ++c) {
            out[i * kOutChannels + c] = static_cast<uint8_t>((p[c] * a + 255u * (255u - a) + 127u) / 255u);
        }
    }
}

// Copy RGB as is.
void copy_rgb(const PixelView& src, uint8_t* out) {
    std::memcpy(out, src.data, static_cast<size_t>(src.width) * src.height * kOutChannels);
}

// Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many
// pixels as the width does (Resample.c, ImagingResampleInner); the pass order changes the uint8
// rounding of the intermediate image, so it is part of the arithmetic to reproduce.
bool vertical_pass_first(int in_width, int in_height, int out_width, int out_height) {
    const int rows_removed = in_height - out_height;
    return rows_removed > 0 && rows_removed > (in_width - out_width) * 2;
}

// flatten_on_white(image).resize((out_width, out_height), BICUBIC); inputs already validated.
void resize_bicubic_rgb(const PixelView& given, int out_width, int out_height, uint8_t* out) {
    std::vector<uint8_t> flat;
    PixelView src = given;
    if (given.channels == 4) {  // transparency first, as Python does before the resize
        flat.resize(static_cast<size_t>(given.width) * given.height * kOutChannels);
        flatten_on_white(given, flat.data());
        src = PixelView{flat.data(), given.width, given.height, kOutChannels};
    }
    const bool need_horizontal = out_width != src.width;
    const bool need_vertical = out_height != src.height;
    if (!need_horizontal && !need_vertical) {
        copy_rgb(src, out);
        return;
    }
    if (!need_horizontal) {
        resample_vertical(src, 0, compute_taps(src.height, out_height), out_height, out);
        return;
    }
    const ResampleTaps horizontal = compute_taps(src.width, out_width);
    if (!need_vertical) {
        resample_horizontal(src, 0, src.height, horizontal, out_width, out);
        return;
    }
    const ResampleTaps vertical = compute_taps(src.height, out_height);
    if (vertical_pass_first(src.width, src.height, out_width, out_height)) {
        std::vector<uint8_t> temp(static_cast<size_t>(out_height) * src.width * kOutChannels);
        resample_vertical(src, 0, vertical, out_height, temp.data());  // (out_height, in_width, 3)
        const PixelView mid{temp.data(), src.width, out_height, kOutChannels};
        resample_horizontal(mid, 0, out_height, horizontal, out_width, out);
        return;
    }
    // Horizontal first, over only the source rows that some output row reads.
    const int row_begin = vertical.first.front();
    const int row_end = vertical.first.back() + vertical.count.back();
    std::vector<uint8_t> temp(static_cast<size_t>(row_end - row_begin) * out_width * kOutChannels);
    resample_horizontal(src, row_begin, row_end, horizontal, out_width, temp.data());
    const PixelView mid{temp.data(), out_width, row_end - row_begin, kOutChannels};  // (rows, out_width, 3)
    resample_vertical(mid, row_begin, vertical, out_height, out);
}

int validate_input(const unsigned char* pixels, int width, int height, int channels, const void* out,
                   int out_width, int out_height) {
    if (pixels == nullptr || out == nullptr) return QWENVL_PREPROCESS_ERR_NULL;
    if (width <= 0 || height <= 0 || out_width <= 0 || out_height <= 0) return QWENVL_PREPROCESS_ERR_SIZE;
    if (channels != 3 && channels != 4) return QWENVL_PREPROCESS_ERR_CHANNELS;
    if (width > QWENVL_PREPROCESS_MAX_SIDE || height > QWENVL_PREPROCESS_MAX_SIDE ||
        static_cast<long long>(width) * height > QWENVL_PREPROCESS_MAX_PIXELS ||
        out_width > QWENVL_PREPROCESS_MAX_OUTPUT_SIDE || out_height > QWENVL_PREPROCESS_MAX_OUTPUT_SIDE) {
        return QWENVL_PREPROCESS_ERR_TOO_LARGE;
    }
    return QWENVL_PREPROCESS_OK;
}

}  // namespace

extern "C" int qwenvl_resize_bicubic_u8(const unsigned char* pixels, int width, int height, int channels,
                                        int out_width, int out_height, unsigned char* out) {
    const int rc = validate_input(pixels, width, height, channels, out, out_width, out_height);
    if (rc != QWENVL_PREPROCESS_OK) return rc;
    try {
        resize_bicubic_rgb(PixelView{pixels, width, height, channels}, out_width, out_height, out);
    } catch (const std::bad_alloc&) {
        return QWENVL_PREPROCESS_ERR_NO_MEMORY;
    } catch (const std::length_error&) {
        return QWENVL_PREPROCESS_ERR_NO_MEMORY;
    }
    return QWENVL_PREPROCESS_OK;
}

extern "C" int qwenvl_preprocess_image(const unsigned char* pixels, int width, int height, int channels,
                                       int image_size, const float* mean, const float* std, float* out) {
    const int rc = validate_input(pixels, width, height, channels, out, image_size, image_size);
    if (rc != QWENVL_PREPROCESS_OK) return rc;
    if (mean == nullptr || std == nullptr) return QWENVL_PREPROCESS_ERR_NULL;
    for (int c = 0; c < kOutChannels; ++c) {
        if (!(std[c] > 0.0f) || !std::isfinite(mean[c]) || !std::isfinite(std[c])) return QWENVL_PREPROCESS_ERR_NORM;
    }
    try {
        const size_t plane = static_cast<size_t>(image_size) * image_size;
        std::vector<uint8_t> rgb(plane * kOutChannels);  // (S, S, 3) uint8
        resize_bicubic_rgb(PixelView{pixels, width, height, channels}, image_size, image_size, rgb.data());

        // float32 throughout, as numpy does: (float(v) / 255 - mean) / std, one value per byte.
        float table[kOutChannels][256];
        for (int c = 0; c < kOutChannels; ++c) {
            for (int v = 0; v < 256; ++v) {
                const float x = static_cast<float>(v) / 255.0f;
                table[c][v] = (x - mean[c]) / std[c];
            }
        }
        for (int c = 0; c < kOutChannels; ++c) {  // out: (3, S, S) float32
            float* dst = out + c * plane;
            for (size_t i = 0; i < plane; ++i) dst[i] = table[c][rgb[i * kOutChannels + c]];
        }
    } catch (const std::bad_alloc&) {
        return QWENVL_PREPROCESS_ERR_NO_MEMORY;
    } catch (const std::length_error&) {
        return QWENVL_PREPROCESS_ERR_NO_MEMORY;
    }
    return QWENVL_PREPROCESS_OK;
}

extern "C" const char* qwenvl_preprocess_error_string(int code) {
    switch (code) {
        case QWENVL_PREPROCESS_OK: return "ok";
        case QWENVL_PREPROCESS_ERR_NULL: return "a pixel or output pointer is NULL";
        case QWENVL_PREPROCESS_ERR_SIZE: return "image width, height or output size is not positive";
        case QWENVL_PREPROCESS_ERR_CHANNELS: return "channels must be 3 (RGB) or 4 (RGBA)";
        case QWENVL_PREPROCESS_ERR_TOO_LARGE:
            return "image too large (side over 65535, over 178956970 pixels, or output side over 8192)";
        case QWENVL_PREPROCESS_ERR_NO_MEMORY: return "out of memory while resizing the image";
        case QWENVL_PREPROCESS_ERR_NORM: return "mean/std must be finite and every std above 0";
        default: return "unknown error code";
    }
}
