// image_file.cpp - see image_file.h.
#include "image_file.h"

#include <algorithm>
#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>

#ifdef QWENVL_HAVE_PNG
#include <png.h>
#endif
#ifdef QWENVL_HAVE_JPEG
#include <jpeglib.h>
#endif

namespace qwenvl::tool {
namespace {

constexpr int64_t kMaxPixels = int64_t{1} << 27;      // runtime/preprocess.py MAX_PIXELS
constexpr int64_t kMaxPixelsJpeg = int64_t{1} << 28;  // MAX_PIXELS_JPEG (decoded at a reduced scale)
constexpr int64_t kDraftAbove = int64_t{1} << 24;     // DRAFT_ABOVE
constexpr long kMaxFileBytes = 1L << 30;

[[noreturn]] void bad(const std::string& why) { throw std::runtime_error(why); }

void check_pixels(int64_t w, int64_t h, int64_t limit, const char* format) {
    if (w <= 0 || h <= 0) bad(std::string("empty ") + format + " image");
    if (w > 65535 || h > 65535 || w * h > limit) {
        bad("refused as a possible decompression bomb (" + std::to_string(w) + "x" + std::to_string(h) + " = " +
            std::to_string(w * h) + " pixels, over " + std::to_string(limit) + " for " + format + ")");
    }
}

struct FileCloser {
    void operator()(FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<FILE, FileCloser>;

// --- EXIF orientation (TIFF IFD0 tag 0x0112), as PIL.ImageOps.exif_transpose reads it ---------------

int exif_orientation(const uint8_t* p, size_t n) {
    if (n >= 6 && std::memcmp(p, "Exif\0\0", 6) == 0) {
        p += 6;
        n -= 6;
    }
    if (n < 8) return 1;
    const bool le = p[0] == 'I' && p[1] == 'I';
    if (!le && !(p[0] == 'M' && p[1] == 'M')) return 1;
    const auto u16 = [&](size_t at) -> uint32_t {
        return le ? uint32_t(p[at]) | uint32_t(p[at + 1]) << 8 : uint32_t(p[at]) << 8 | uint32_t(p[at + 1]);
    };
    const auto u32 = [&](size_t at) -> uint32_t {
        return le ? u16(at) | u16(at + 2) << 16 : u16(at) << 16 | u16(at + 2);
    };
    if (u16(2) != 42) return 1;
    const size_t ifd = u32(4);
    if (ifd + 2 > n) return 1;
    const uint32_t count = u16(ifd);
    for (uint32_t k = 0; k < count; ++k) {
        const size_t e = ifd + 2 + size_t{12} * k;
        if (e + 12 > n) break;
        if (u16(e) == 0x0112 && u16(e + 2) == 3) {
            const uint32_t v = u16(e + 8);
            return v >= 1 && v <= 8 ? static_cast<int>(v) : 1;
        }
    }
    return 1;
}

// Pillow's exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 270 (clockwise 90),
// 7 transverse, 8 rotate 90 (counter-clockwise).
RgbImage apply_orientation(RgbImage in, int orientation) {
    if (orientation <= 1 || orientation > 8) return in;
    const int W = in.width, H = in.height;
    const bool swap = orientation >= 5;
    RgbImage out;
    out.width = swap ? H : W;
    out.height = swap ? W : H;
    out.rgb.resize(in.rgb.size());
    for (int y = 0; y < out.height; ++y) {
        for (int x = 0; x < out.width; ++x) {
            int ix = x, iy = y;
            switch (orientation) {
                case 2: ix = W - 1 - x; break;
                case 3: ix = W - 1 - x; iy = H - 1 - y; break;
                case 4: iy = H - 1 - y; break;
                case 5: ix = y; iy = x; break;
                case 6: ix = y; iy = H - 1 - x; break;
                case 7: ix = W - 1 - y; iy = H - 1 - x; break;
                case 8: ix = W - 1 - y; iy = x; break;
                default: break;
            }
            const size_t o = (size_t(y) * size_t(out.width) + size_t(x)) * 3;
            const size_t i = (size_t(iy) * size_t(W) + size_t(ix)) * 3;
            std::memcpy(&out.rgb[o], &in.rgb[i], 3);
        }
    }
    return out;
}

// --- transparency ----------------------------------------------------------------------------------

// RGBA -> RGB composited onto white, in place: (c * a + 255 * (255 - a) + 127) / 255, the runtime's
// flatten_on_white (runtime/preprocess.py) and qwenvl_preprocess_image's, so a transparent PNG gives the
// model what a browser shows (the original dropped alpha: transparent pixels came out black).
void flatten_on_white(std::vector<uint8_t>* pixels, size_t n) {
    uint8_t* p = pixels->data();
    for (size_t i = 0; i < n; ++i) {
        const unsigned r = p[4 * i], g = p[4 * i + 1], b = p[4 * i + 2], a = p[4 * i + 3];  // read before the write
        const unsigned white = 255u * (255u - a) + 127u;
        p[3 * i] = static_cast<uint8_t>((r * a + white) / 255u);
        p[3 * i + 1] = static_cast<uint8_t>((g * a + white) / 255u);
        p[3 * i + 2] = static_cast<uint8_t>((b * a + white) / 255u);
    }
    pixels->resize(n * 3);
}

// --- PPM / PGM (binary, maxval 255) ----------------------------------------------------------------

RgbImage read_pnm(FILE* f) {
    char magic[2];
    if (std::fread(magic, 1, 2, f) != 2 || magic[0] != 'P' || (magic[1] != '6' && magic[1] != '5')) bad("not a P6/P5 file");
    long fields[3] = {0, 0, 0};
    for (long& field : fields) {
        int c = std::fgetc(f);
        while (c == '#' || c == ' ' || c == '\t' || c == '\r' || c == '\n') {
            if (c == '#') {
                while (c != '\n' && c != EOF) c = std::fgetc(f);
            }
            c = std::fgetc(f);
        }
        if (c < '0' || c > '9') bad("bad PPM header");
        while (c >= '0' && c <= '9') {
            field = field * 10 + (c - '0');
            if (field > 1000000) bad("bad PPM header");
            c = std::fgetc(f);
        }
    }
    if (fields[2] != 255) bad("PPM maxval " + std::to_string(fields[2]) + ": only 8-bit (255) is read");
    check_pixels(fields[0], fields[1], kMaxPixels, "PPM");
    RgbImage im;
    im.width = static_cast<int>(fields[0]);
    im.height = static_cast<int>(fields[1]);
    const size_t n = size_t(im.width) * size_t(im.height);
    im.rgb.resize(n * 3);
    if (magic[1] == '6') {
        if (std::fread(im.rgb.data(), 1, n * 3, f) != n * 3) bad("truncated PPM data");
    } else {
        std::vector<uint8_t> gray(n);
        if (std::fread(gray.data(), 1, n, f) != n) bad("truncated PGM data");
        for (size_t k = 0; k < n; ++k) im.rgb[3 * k] = im.rgb[3 * k + 1] = im.rgb[3 * k + 2] = gray[k];
    }
    return im;
}

// --- PNG ---------------------------------------------------------------------------------------------

#ifdef QWENVL_HAVE_PNG
struct PngError {
    char message[200] = {0};
};

void png_error_handler(png_structp png, png_const_charp msg) {
    auto* e = static_cast<PngError*>(png_get_error_ptr(png));
    std::snprintf(e->message, sizeof e->message, "%s", msg ? msg : "PNG error");
    png_longjmp(png, 1);
}
void png_warning_handler(png_structp, png_const_charp) {}

// Decodes into `im` (no C++ objects with destructors live across the setjmp); returns the EXIF
// orientation, or 0 with err->message set.
int decode_png(FILE* f, RgbImage* im, PngError* err) {
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, err, png_error_handler, png_warning_handler);
    if (png == nullptr) return 0;
    png_infop info = png_create_info_struct(png);
    png_bytep* volatile rows = nullptr;  // set after setjmp: volatile keeps it valid after a longjmp
    if (info == nullptr || setjmp(png_jmpbuf(png))) {
        delete[] rows;
        png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
        if (err->message[0] == '\0') std::snprintf(err->message, sizeof err->message, "cannot decode PNG");
        return 0;
    }
    png_init_io(png, f);
    png_set_user_limits(png, 65535, 65535);
    png_read_info(png, info);
    const png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    if (int64_t(w) * int64_t(h) > kMaxPixels) png_error(png, "image over the pixel limit (decompression bomb?)");
    const int type = png_get_color_type(png, info);
    const int depth = png_get_bit_depth(png, info);
    if (depth == 16) {
        // Pillow: 16-bit gray is scaled (runtime/preprocess.py: rint(v / 257)); 16-bit colour and gray + alpha
        // (opened as RGBA) keep the high byte
        if (type == PNG_COLOR_TYPE_GRAY) png_set_scale_16(png);
        else png_set_strip_16(png);
    }
    // a transparent colour (tRNS) becomes alpha, as Pillow's convert("RGBA") makes it; not at 16 bits, where
    // the runtime drops the key (gray is scaled to 8 bits first; Pillow compares 16-bit RGB keys to 8-bit pixels)
    const bool colour_key = png_get_valid(png, info, PNG_INFO_tRNS) != 0 && depth <= 8;
    const bool alpha = (type & PNG_COLOR_MASK_ALPHA) != 0 || colour_key;
    if (type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (type == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    if (colour_key) png_set_tRNS_to_alpha(png);
    if (type == PNG_COLOR_TYPE_GRAY || type == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    const size_t channels = alpha ? 4 : 3;
    if (png_get_rowbytes(png, info) != size_t(w) * channels) png_error(png, "unexpected PNG row layout");
    im->width = static_cast<int>(w);
    im->height = static_cast<int>(h);
    im->rgb.resize(size_t(w) * size_t(h) * channels);
    rows = new png_bytep[h];
    for (png_uint_32 y = 0; y < h; ++y) rows[y] = im->rgb.data() + size_t(y) * size_t(w) * channels;
    png_read_image(png, rows);
    png_read_end(png, info);
    if (alpha) flatten_on_white(&im->rgb, size_t(w) * size_t(h));
    int orientation = 1;
    png_uint_32 exif_len = 0;
    png_bytep exif = nullptr;
#ifdef PNG_eXIf_SUPPORTED
    if (png_get_eXIf_1(png, info, &exif_len, &exif) != 0 && exif != nullptr) orientation = exif_orientation(exif, exif_len);
#endif
    delete[] rows;
    png_destroy_read_struct(&png, &info, nullptr);
    return orientation;
}
#endif

// --- JPEG ---------------------------------------------------------------------------------------------

#ifdef QWENVL_HAVE_JPEG
struct JpegError {
    jpeg_error_mgr mgr;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX] = {0};
};

void jpeg_error_handler(j_common_ptr cinfo) {
    auto* e = reinterpret_cast<JpegError*>(cinfo->err);
    cinfo->err->format_message(cinfo, e->message);
    std::longjmp(e->jump, 1);
}

// Same contract as decode_png.
int decode_jpeg(FILE* f, int image_size, RgbImage* im, JpegError* err) {
    jpeg_decompress_struct cinfo;
    cinfo.err = jpeg_std_error(&err->mgr);
    err->mgr.error_exit = jpeg_error_handler;
    err->mgr.output_message = [](j_common_ptr) {};
    if (setjmp(err->jump)) {
        jpeg_destroy_decompress(&cinfo);
        return 0;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_stdio_src(&cinfo, f);
    jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(&cinfo, TRUE);
    const int64_t w = cinfo.image_width, h = cinfo.image_height;
    if (w <= 0 || h <= 0 || w > 65535 || h > 65535 || w * h > kMaxPixelsJpeg) {
        std::snprintf(err->message, sizeof err->message, "refused as a possible decompression bomb (%lldx%lld pixels)",
                      static_cast<long long>(w), static_cast<long long>(h));
        jpeg_destroy_decompress(&cinfo);
        return 0;
    }
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        std::snprintf(err->message, sizeof err->message, "CMYK JPEG is not read by the native command: convert it to RGB");
        jpeg_destroy_decompress(&cinfo);
        return 0;
    }
    int orientation = 1;
    for (jpeg_saved_marker_ptr m = cinfo.marker_list; m != nullptr; m = m->next) {
        if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && std::memcmp(m->data, "Exif\0\0", 6) == 0) {
            orientation = exif_orientation(m->data, m->data_length);
            break;
        }
    }
    cinfo.out_color_space = JCS_RGB;
    if (w * h > kDraftAbove && image_size > 0) {  // Pillow's draft("RGB", (S, S)): the largest 1/denom keeping S
        const int64_t fit = std::min(w / image_size, h / image_size);
        unsigned denom = 1;
        for (unsigned d : {8u, 4u, 2u}) {
            if (fit >= d) {
                denom = d;
                break;
            }
        }
        cinfo.scale_num = 1;
        cinfo.scale_denom = denom;
    }
    jpeg_start_decompress(&cinfo);
    im->width = static_cast<int>(cinfo.output_width);
    im->height = static_cast<int>(cinfo.output_height);
    im->rgb.resize(size_t(cinfo.output_width) * size_t(cinfo.output_height) * 3);
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = im->rgb.data() + size_t(cinfo.output_scanline) * size_t(cinfo.output_width) * 3;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return orientation;
}
#endif

}  // namespace

std::string image_formats() {
    std::string out;
#ifdef QWENVL_HAVE_PNG
    out += "PNG, ";
#endif
#ifdef QWENVL_HAVE_JPEG
    out += "JPEG, ";
#endif
    return out + "PPM/PGM";
}

RgbImage read_image_file(const std::string& path, int image_size) {
    File file(std::fopen(path.c_str(), "rb"));
    if (!file) bad(std::string("cannot read image (") + std::strerror(errno) + ")");
    FILE* f = file.get();
    if (std::fseek(f, 0, SEEK_END) != 0) bad("cannot read image (not a regular file)");
    const long size = std::ftell(f);
    if (size < 0) bad("cannot read image (not a regular file)");
    if (size > kMaxFileBytes) bad("file larger than 1073741824 bytes: not an image we decode");
    std::rewind(f);
    uint8_t head[8] = {0};
    const size_t n = std::fread(head, 1, sizeof head, f);
    std::rewind(f);
    RgbImage im;
    int orientation = 1;
    if (n >= 8 && std::memcmp(head, "\x89PNG\r\n\x1a\n", 8) == 0) {
#ifdef QWENVL_HAVE_PNG
        PngError err;
        orientation = decode_png(f, &im, &err);
        if (orientation == 0) bad(std::string("cannot read image (PNG: ") + err.message + ")");
#else
        bad("PNG: this build has no libpng (formats read: " + image_formats() + ")");
#endif
    } else if (n >= 3 && head[0] == 0xFF && head[1] == 0xD8 && head[2] == 0xFF) {
#ifdef QWENVL_HAVE_JPEG
        JpegError err;
        orientation = decode_jpeg(f, image_size, &im, &err);
        if (orientation == 0) bad(std::string("cannot read image (JPEG: ") + err.message + ")");
#else
        bad("JPEG: this build has no libjpeg (formats read: " + image_formats() + ")");
#endif
    } else if (n >= 2 && head[0] == 'P' && (head[1] == '6' || head[1] == '5')) {
        im = read_pnm(f);
    } else {
        bad("cannot read image (not a format the native command reads: " + image_formats() + ")");
    }
    return apply_orientation(std::move(im), orientation);
}

}  // namespace qwenvl::tool
