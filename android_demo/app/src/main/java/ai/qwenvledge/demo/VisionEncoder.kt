package ai.qwenvledge.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import ai.onnxruntime.TensorInfo
import java.io.Closeable
import java.io.File
import java.nio.FloatBuffer

/**
 * The bundle's vision.onnx (ViT + adapter) in ONNX Runtime: pixel_values float32 [N, 3, S, S] ->
 * image_embeds float32 [N, n_queries, hidden]. One image per call: a phone has no use for batches
 * and one image keeps the peak memory down.
 *
 * The session is created from the file path (not bytes) so ONNX Runtime finds `vision.onnx.data`
 * (external weights) beside it and can map the weights instead of copying them.
 */
class VisionEncoder(
    model: File,
    private val imageSize: Int,
    private val nQueries: Int,
    private val hiddenSize: Int,
    nThreads: Int,
) : Closeable {
    private val env = OrtEnvironment.getEnvironment()
    private var session: OrtSession? = OrtSession.SessionOptions().use { options ->
        options.setIntraOpNumThreads(nThreads)
        options.setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT)
        env.createSession(model.absolutePath, options)
    }

    init {
        try {
            checkSignature(session!!, model)
        } catch (e: Exception) {
            close()
            throw e
        }
    }

    /** One image's pixels, float32 [3, S, S] as QwenVLNative.preprocess makes them -> [n_queries * hidden] rows. */
    fun encode(pixels: FloatArray): FloatArray {
        val session = checkNotNull(session) { "the vision encoder is closed" }
        require(pixels.size == 3 * imageSize * imageSize) {
            "pixel_values has ${pixels.size} floats, expected 3 x $imageSize x $imageSize"
        }
        val shape = longArrayOf(1, 3, imageSize.toLong(), imageSize.toLong())
        OnnxTensor.createTensor(env, FloatBuffer.wrap(pixels), shape).use { input ->
            session.run(mapOf(INPUT to input)).use { result ->
                val output = result.get(OUTPUT).orElseThrow { IllegalStateException("no $OUTPUT output") } as OnnxTensor
                val got = output.info.shape
                check(got.contentEquals(longArrayOf(1, nQueries.toLong(), hiddenSize.toLong()))) {
                    "$OUTPUT has shape ${got.contentToString()}, expected [1, $nQueries, $hiddenSize]"
                }
                val buffer = output.floatBuffer  // (1, n_queries, hidden) float32
                return FloatArray(buffer.remaining()).also { buffer.get(it) }
            }
        }
    }

    override fun close() {
        session?.close()
        session = null
    }

    /** Names, type and sizes once, at load: a bundle from another export fails here with a clear line. */
    private fun checkSignature(session: OrtSession, model: File) {
        val input = session.inputInfo[INPUT]?.info as? TensorInfo
            ?: throw BundleException("$model: no float input '$INPUT' (inputs: ${session.inputNames})")
        val output = session.outputInfo[OUTPUT]?.info as? TensorInfo
            ?: throw BundleException("$model: no output '$OUTPUT' (outputs: ${session.outputNames})")
        val side = input.shape.takeLast(2)
        if (input.shape.size != 4 || side.any { it != imageSize.toLong() }) {
            throw BundleException("$model: $INPUT shape ${input.shape.contentToString()}, manifest image_size $imageSize")
        }
        if (output.shape.size != 3 || output.shape[2] != hiddenSize.toLong()) {
            throw BundleException("$model: $OUTPUT shape ${output.shape.contentToString()}, manifest hidden_size $hiddenSize")
        }
    }

    companion object {
        const val INPUT = "pixel_values"
        const val OUTPUT = "image_embeds"
    }
}
