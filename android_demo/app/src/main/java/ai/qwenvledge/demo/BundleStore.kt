package ai.qwenvledge.demo

import android.content.Context
import org.json.JSONObject
import java.io.File

/**
 * An opened bundle folder (written by `qwenvl-edge export`): what the app needs from manifest.json.
 * The manifest is the only description of the model the app gets, as for the Python runtime
 * (runtime/bundle.py): sizes come from it, never from constants.
 */
data class BundleInfo(
    val folder: File,
    val imageSize: Int,      // vision input side S: pixel_values [N, 3, S, S]
    val imageMean: FloatArray, // per-channel normalisation (the model's CLIP mean/std, 3 floats each)
    val imageStd: FloatArray,
    val hiddenSize: Int,     // image row width: image_embeds [N, n_queries, hidden]
    val nQueries: Int,       // image rows per image (256)
    val seqLength: Int,      // the decoder's trained context (2048)
    val topP: Float,
    val maxNewTokens: Int,
    val visionFile: File,
    val llmFile: File,
    val files: Map<String, FileEntry>,
)

/**
 * Where bundles live and how they get there.
 *
 * Two places are looked at, in order:
 * - [internalDir] `files/bundle` (app-private; `adb shell run-as` or the in-app download put it there);
 * - [externalDir] `Android/data/<package>/files/bundle` (app-specific external storage; `adb push`
 *   can write there directly).
 * A folder counts once its manifest.json is there: the downloader writes the manifest last.
 */
class BundleStore(context: Context) {
    val internalDir = File(context.filesDir, BUNDLE)
    val externalDir: File? = context.getExternalFilesDir(null)?.let { File(it, BUNDLE) }
    private val stagingDir = File(context.filesDir, "$BUNDLE.download")

    fun candidates(): List<File> = listOfNotNull(internalDir, externalDir)

    /** The first folder with a manifest, checked (every listed file present with its size). */
    fun open(): BundleInfo {
        val folder = candidates().firstOrNull { File(it, BundleDownloader.MANIFEST).isFile }
            ?: throw BundleException("no bundle: looked for manifest.json in ${candidates().joinToString(" and ")}")
        return read(folder)
    }

    /**
     * Download a bundle served at [baseUrl] (a folder URL holding manifest.json and its files) and
     * make it the internal bundle. Resumable: a second call continues where the first stopped.
     */
    fun download(baseUrl: String, onProgress: (DownloadProgress) -> Unit, checkCancelled: () -> Unit): BundleInfo {
        File(stagingDir, BundleDownloader.MANIFEST).delete()  // a staged manifest from an older run is stale
        BundleDownloader(baseUrl, stagingDir) { text -> requiredFiles(JSONObject(text)) }
            .download(onProgress, checkCancelled)
        read(stagingDir)  // refuse to install what the app could not open
        if (internalDir.exists() && !internalDir.deleteRecursively()) {
            throw BundleException("$internalDir: cannot remove the old bundle")
        }
        if (!stagingDir.renameTo(internalDir)) throw BundleException("$internalDir: cannot install the bundle")
        return read(internalDir)
    }

    companion object {
        const val BUNDLE = "bundle"
        private const val FORMAT = "qwenvl-edge-bundle"
        private const val FORMAT_VERSION = 1

        fun read(folder: File): BundleInfo {
            val path = File(folder, BundleDownloader.MANIFEST)
            val manifest = try {
                JSONObject(path.readText())
            } catch (e: Exception) {
                throw BundleException("$path: unreadable manifest (${e.message})")
            }
            if (manifest.optString("format") != FORMAT) throw BundleException("$path: not a qwenvl-edge manifest")
            val version = manifest.optInt("format_version", -1)
            if (version != FORMAT_VERSION) {
                throw BundleException("$path: format_version $version is not $FORMAT_VERSION; re-export the bundle")
            }
            val info = try {
                val model = manifest.getJSONObject("model")
                val files = requiredFiles(manifest)
                BundleInfo(
                    folder = folder,
                    imageSize = model.getInt("image_size"),
                    imageMean = floats3(model.getJSONArray("image_mean"), path, "image_mean"),
                    imageStd = floats3(model.getJSONArray("image_std"), path, "image_std"),
                    hiddenSize = model.getInt("hidden_size"),
                    nQueries = model.optInt("n_queries", 256),
                    seqLength = model.optInt("seq_length", 2048),
                    topP = model.optDouble("top_p", 0.3).toFloat(),
                    maxNewTokens = model.optInt("max_new_tokens", 512),
                    visionFile = File(folder, visionName(manifest)),
                    llmFile = File(folder, llmName(manifest)),
                    files = files,
                )
            } catch (e: org.json.JSONException) {
                throw BundleException("$path: corrupt manifest (${e.message})")
            }
            for ((name, entry) in info.files) {
                val part = File(folder, name)
                if (!part.isFile) throw BundleException("$part: missing bundle file")
                if (part.length() != entry.bytes) {
                    throw BundleException("$part: ${part.length()} bytes, manifest says ${entry.bytes}: truncated?")
                }
            }
            return info
        }

        private fun floats3(array: org.json.JSONArray, path: File, name: String): FloatArray {
            if (array.length() != 3) throw BundleException("$path: model.$name must hold 3 numbers")
            return FloatArray(3) { array.getDouble(it).toFloat() }
        }

        private fun visionName(manifest: JSONObject) = manifest.getJSONObject("vision").optString("file", "vision.onnx")

        private fun llmName(manifest: JSONObject) = manifest.getJSONObject("llm").optString("file", "llm.gguf")

        /**
         * The listed files the app uses: the vision model with its external weights (`vision.onnx.data`)
         * and the decoder. Others (e.g. a kept `vision_fp32.onnx`) are neither downloaded nor required.
         */
        private fun requiredFiles(manifest: JSONObject): Map<String, FileEntry> {
            val vision = visionName(manifest)
            val llm = llmName(manifest)
            val files = manifest.getJSONObject("files")
            val needed = files.keys().asSequence().filter { it == vision || it == llm || it.startsWith("$vision.") }
            val entries = needed.associateWith { name ->
                val entry = files.getJSONObject(name)
                FileEntry(entry.getLong("bytes"), entry.getString("sha256"))
            }
            for (name in listOf(vision, llm)) {
                if (name !in entries) throw BundleException("manifest.json lists no $name")
            }
            return entries
        }
    }
}
