package ai.qwenvledge.demo

import ai.qwenvledge.QwenVLNative
import java.io.Closeable

/**
 * The bundle's vision.onnx (vision encoder + adapter) in the native core, through [QwenVLNative]: the same
 * code as `qwenvl-native` and the ARM64 tests (native/src/vision_encoder.cpp over ONNX Runtime's C API, the
 * libonnxruntime.so packaged with the app). One photo per call: the Pillow-exact resize, the bundle's
 * mean/std and the vision graph run in one native call, and only the rows come back.
 *
 * One call at a time (ChatViewModel holds a lock); [close] frees ONNX Runtime's memory for the decoder.
 */
class QwenVision private constructor(private var handle: Long) : Closeable {
    /** One photo's unpremultiplied RGBA pixels -> its rows, n_queries x hidden float32. */
    fun encode(pixels: RgbaPixels, mean: FloatArray, std: FloatArray): FloatArray =
        QwenVLNative.encodeImage(live(), pixels.bytes, pixels.width, pixels.height, 4, mean, std)

    override fun close() {
        if (handle != 0L) QwenVLNative.close(handle)
        handle = 0L
    }

    private fun live(): Long = handle.also { check(it != 0L) { "the vision model is closed" } }

    companion object {
        /**
         * Load [bundle]'s vision model; its input side and row width must be the manifest's (a bundle from
         * another export fails here with one line, before any photo).
         */
        fun open(bundle: BundleInfo, nThreads: Int): QwenVision {
            val vision = QwenVision(QwenVLNative.openVision(bundle.visionFile.absolutePath, nThreads))
            try {
                val side = QwenVLNative.imageSize(vision.handle)
                val width = QwenVLNative.embeddingSize(vision.handle)
                if (side != bundle.imageSize || width != bundle.hiddenSize) {
                    throw BundleException(
                        "${bundle.visionFile}: input side $side and row width $width, manifest image_size " +
                            "${bundle.imageSize} and hidden_size ${bundle.hiddenSize}"
                    )
                }
            } catch (e: Exception) {
                vision.close()
                throw e
            }
            return vision
        }
    }
}
