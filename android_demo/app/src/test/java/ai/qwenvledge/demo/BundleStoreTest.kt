package ai.qwenvledge.demo

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Rule
import org.junit.Test
import org.junit.rules.TemporaryFolder
import java.io.File

/** BundleStore.read on a manifest laid out as runtime/bundle.py's make_manifest writes it. */
class BundleStoreTest {
    @get:Rule
    val tmp = TemporaryFolder()

    private fun bundle(formatVersion: Int = 1, llmBytes: Int = 7, keepFp32: Boolean = true): File {
        val folder = tmp.newFolder()
        File(folder, "vision.onnx").writeBytes(ByteArray(5))
        File(folder, "vision.onnx.data").writeBytes(ByteArray(3))
        File(folder, "llm.gguf").writeBytes(ByteArray(llmBytes))
        val fp32 = if (keepFp32) """, "vision_fp32.onnx": {"bytes": 99, "sha256": "${"c".repeat(64)}"}""" else ""
        File(folder, "manifest.json").writeText(
            """
            {"format": "qwenvl-edge-bundle", "format_version": $formatVersion, "created_by": "qwenvl-edge 0.1.0",
             "model": {"hidden_size": 4096, "vocab_size": 151936, "seq_length": 2048, "image_size": 448,
                       "n_queries": 256, "image_start_id": 7, "image_mean": [0.5, 0.25, 0.125],
                       "image_std": [0.5, 0.5, 0.25],
                       "top_p": 0.3, "top_k": 0, "max_new_tokens": 512},
             "vision": {"file": "vision.onnx", "precision": "int8", "fp32_file": "vision_fp32.onnx"},
             "llm": {"file": "llm.gguf", "type": "Q4_K_M"},
             "files": {"llm.gguf": {"bytes": 7, "sha256": "${"a".repeat(64)}"},
                       "vision.onnx": {"bytes": 5, "sha256": "${"b".repeat(64)}"},
                       "vision.onnx.data": {"bytes": 3, "sha256": "${"d".repeat(64)}"}$fp32},
             "source": {}}
            """.trimIndent(),
        )
        return folder
    }

    @Test
    fun readsSizesFromTheManifestAndSkipsFilesTheAppDoesNotUse() {
        val folder = bundle()
        val info = BundleStore.read(folder)
        assertEquals(448, info.imageSize)
        assertEquals(0.25f, info.imageStd[2])
        assertEquals(4096, info.hiddenSize)
        assertEquals(256, info.nQueries)
        assertEquals(2048, info.seqLength)
        assertEquals(0.3f, info.topP, 1e-6f)
        assertEquals(File(folder, "vision.onnx"), info.visionFile)
        assertEquals(File(folder, "llm.gguf"), info.llmFile)
        assertEquals(setOf("llm.gguf", "vision.onnx", "vision.onnx.data"), info.files.keys)  // no vision_fp32.onnx
    }

    @Test
    fun aTruncatedFileOrAnotherFormatVersionIsRefused() {
        expectBundleError("3 bytes, manifest says 7") { BundleStore.read(bundle(llmBytes = 3)) }
        expectBundleError("format_version 2 is not 1") { BundleStore.read(bundle(formatVersion = 2)) }
        val noData = bundle(keepFp32 = false).also { File(it, "vision.onnx.data").delete() }
        expectBundleError("vision.onnx.data: missing") { BundleStore.read(noData) }
    }

    private fun expectBundleError(part: String, block: () -> Unit) {
        try {
            block()
            fail("no BundleException")
        } catch (e: BundleException) {
            assertTrue(e.message!!, e.message!!.contains(part))
        }
    }
}
