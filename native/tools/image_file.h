// image_file.h - an image file -> upright 8-bit RGB pixels, as the Python runtime reads one
// (runtime/preprocess.py read_image): EXIF orientation applied, transparency (alpha, a tRNS colour key)
// composited onto white as a browser shows it,
// 16-bit gray scaled to 8 bits, large JPEGs decoded at a reduced DCT scale (1/2 .. 1/8, keeping at
// least the model's input side), the same pixel limits.
//
// Formats: PNG (libpng) and JPEG (libjpeg-turbo, the decoder inside Pillow, with its default islow
// DCT and fancy upsampling, so the pixels equal Pillow's) when CMake found them, and binary PPM/PGM
// (P6/P5, always: the format for a build with neither library).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace qwenvl::tool {

struct RgbImage {
    int width = 0;
    int height = 0;
    std::vector<uint8_t> rgb;  // row-major HWC, 3 bytes per pixel
};

// Throws std::runtime_error with a one-line reason (the caller prefixes the path).
RgbImage read_image_file(const std::string& path, int image_size);

// Which formats this build reads ("PNG, JPEG, PPM/PGM").
std::string image_formats();

}  // namespace qwenvl::tool
