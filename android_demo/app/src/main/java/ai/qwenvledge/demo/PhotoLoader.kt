package ai.qwenvledge.demo

import android.content.ContentResolver
import android.graphics.Bitmap
import android.graphics.ImageDecoder
import android.net.Uri
import java.nio.ByteBuffer
import kotlin.math.ceil
import kotlin.math.max
import kotlin.math.sqrt

/** 8-bit RGBA pixels, rows packed: what QwenVLNative.preprocess takes (channels = 4). */
class RgbaPixels(val bytes: ByteArray, val width: Int, val height: Int)

/**
 * Photos from the picker or the camera, decoded the way the Python runtime sees them
 * (runtime/preprocess.py: Pillow, EXIF orientation applied, RGB):
 * - ImageDecoder applies the EXIF orientation itself;
 * - pixels stay unpremultiplied (straight alpha): the native preprocess flattens transparency onto white
 *   with the same integer arithmetic as runtime/preprocess.py, so it needs the colours untouched;
 * - no colour-space conversion: Pillow ignores embedded ICC profiles, so do we.
 */
object PhotoLoader {
    /** Above this the photo is decoded at a power-of-two fraction (only huge panoramas get there). */
    private const val MAX_PIXELS = 50_000_000L

    /** Full-resolution pixels for the vision encoder. */
    fun decodePixels(resolver: ContentResolver, uri: Uri): RgbaPixels {
        val bitmap = ImageDecoder.decodeBitmap(ImageDecoder.createSource(resolver, uri)) { decoder, info, _ ->
            decoder.allocator = ImageDecoder.ALLOCATOR_SOFTWARE
            decoder.isUnpremultipliedRequired = true
            val pixels = info.size.width.toLong() * info.size.height
            if (pixels > MAX_PIXELS) decoder.setTargetSampleSize(ceil(sqrt(pixels.toDouble() / MAX_PIXELS)).toInt())
        }
        val rgba = if (bitmap.config == Bitmap.Config.ARGB_8888) bitmap else bitmap.copy(Bitmap.Config.ARGB_8888, false)
        try {
            return toRgba(rgba)
        } finally {
            if (rgba !== bitmap) rgba.recycle()
            bitmap.recycle()
        }
    }

    /** A premultiplied copy at most [maxSide] pixels on its long side, for the screen. */
    fun decodePreview(resolver: ContentResolver, uri: Uri, maxSide: Int = 2048): Bitmap =
        ImageDecoder.decodeBitmap(ImageDecoder.createSource(resolver, uri)) { decoder, info, _ ->
            val scale = maxSide.toFloat() / max(info.size.width, info.size.height)
            if (scale < 1f) {
                decoder.setTargetSize(
                    max(1, (info.size.width * scale).toInt()),
                    max(1, (info.size.height * scale).toInt()),
                )
            }
        }

    /** ARGB_8888 memory is R, G, B, A bytes; copy it row by row in case rows are padded. */
    private fun toRgba(bitmap: Bitmap): RgbaPixels {
        val width = bitmap.width
        val height = bitmap.height
        val raw = ByteBuffer.allocate(bitmap.rowBytes * height)
        bitmap.copyPixelsToBuffer(raw)
        val rowBytes = width * 4
        if (bitmap.rowBytes == rowBytes) return RgbaPixels(raw.array(), width, height)
        val packed = ByteArray(rowBytes * height)
        for (y in 0 until height) System.arraycopy(raw.array(), y * bitmap.rowBytes, packed, y * rowBytes, rowBytes)
        return RgbaPixels(packed, width, height)
    }
}
