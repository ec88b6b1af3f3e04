package ai.qwenvledge.demo

import ai.qwenvledge.QwenVLNative
import java.io.Closeable
import java.io.File

/**
 * The decoder GGUF in llama.cpp, through the JNI class [QwenVLNative]: one model + context + chat.
 *
 * Not thread-safe, by design of the native session: the app calls it from one thread only
 * (ChatViewModel's decoder dispatcher). The KV cache lives across [generate] calls, so a follow-up
 * question about the same photo decodes only its own tokens.
 */
class QwenDecoder private constructor(private var handle: Long) : Closeable {
    val embeddingSize: Int get() = QwenVLNative.embeddingSize(live())

    /**
     * Answer [question]; [images] holds one array of n_queries x hidden rows per new image.
     * [onPiece] gets the reply as it grows and returns false to stop.
     */
    fun generate(
        images: List<FloatArray>,
        question: String,
        maxTokens: Int,
        temperature: Float,
        topP: Float,
        onPiece: (String) -> Boolean,
    ): String {
        val rows = if (images.isEmpty()) null else images.toTypedArray()
        return QwenVLNative.generate(live(), rows, question, maxTokens, temperature, topP) { piece -> onPiece(piece) }
    }

    fun resetChat() = QwenVLNative.resetChat(live())

    override fun close() {
        if (handle != 0L) QwenVLNative.close(handle)
        handle = 0L
    }

    private fun live(): Long = handle.also { check(it != 0L) { "the decoder is closed" } }

    companion object {
        /**
         * Load [gguf]; [nCtx] positions = text tokens + 256 per image. [kvType] "q8_0" halves the KV cache (the
         * phone setting) or "f16" (the desktop's); [mapWeights] maps the GGUF as it is instead of reading and
         * repacking it (slower kernels, but weights the OS can drop under memory pressure).
         */
        fun open(gguf: File, nCtx: Int, nThreads: Int, kvType: String, mapWeights: Boolean): QwenDecoder =
            QwenDecoder(QwenVLNative.open(gguf.absolutePath, nCtx, nThreads, kvType, mapWeights))
    }
}
