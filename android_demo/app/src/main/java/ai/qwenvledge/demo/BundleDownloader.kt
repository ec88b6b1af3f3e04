package ai.qwenvledge.demo

import java.io.File
import java.io.FileOutputStream
import java.io.IOException
import java.net.HttpURLConnection
import java.net.URL
import java.security.MessageDigest

/** Size and sha256 of one bundle file, as manifest.json lists them. */
data class FileEntry(val bytes: Long, val sha256: String)

/** Where a download is: the current file and the bytes done of all files. */
data class DownloadProgress(val file: String, val doneBytes: Long, val totalBytes: Long)

class BundleException(message: String) : Exception(message)

/**
 * Downloads a bundle folder served over HTTP(S): `<base>/manifest.json`, then every file it lists.
 *
 * Plain JVM code (no Android API) so that it runs in unit tests. Why each step:
 * - files land in [staging] as `name.part` and are renamed only once their size and sha256 match
 *   the manifest, so a broken transfer never looks like a model;
 * - an interrupted `name.part` is resumed with an HTTP Range request (multi-GB files on phones);
 * - manifest.json is written last: a folder with a manifest is a complete bundle.
 * [parseFiles] reads the manifest's `files` table (org.json on Android, anything in tests).
 */
class BundleDownloader(
    baseUrl: String,
    private val staging: File,
    private val parseFiles: (String) -> Map<String, FileEntry>,
) {
    private val base = baseUrl.trim().trimEnd('/')

    init {
        if (!base.startsWith("https://") && !base.startsWith("http://")) {
            throw BundleException("$baseUrl: not an http(s) URL")
        }
    }

    /** Fetch everything into [staging]; [checkCancelled] throws to stop between blocks. */
    fun download(onProgress: (DownloadProgress) -> Unit, checkCancelled: () -> Unit) {
        if (!staging.isDirectory && !staging.mkdirs()) throw BundleException("$staging: cannot create the folder")
        val manifestText = fetchText("$base/$MANIFEST")
        val files = try {
            parseFiles(manifestText)
        } catch (e: Exception) {
            throw BundleException("$base/$MANIFEST: not a qwenvl-edge manifest (${e.message})")
        }
        if (files.isEmpty()) throw BundleException("$base/$MANIFEST: lists no files")
        files.keys.forEach(::checkName)

        val total = files.values.sumOf { it.bytes }
        val missing = files.entries.filterNot { (name, entry) -> isComplete(File(staging, name), entry) }
        val needed = missing.sumOf { it.value.bytes }
        if (staging.usableSpace < needed) {
            throw BundleException("$staging: ${needed shr 20} MiB needed, ${staging.usableSpace shr 20} MiB free")
        }
        var done = total - needed
        for ((name, entry) in missing) {
            downloadFile(name, entry, checkCancelled) { fileDone ->
                onProgress(DownloadProgress(name, done + fileDone, total))
            }
            done += entry.bytes
        }
        writeAtomically(File(staging, MANIFEST), manifestText.toByteArray())
        onProgress(DownloadProgress(MANIFEST, total, total))
    }

    private fun downloadFile(name: String, entry: FileEntry, checkCancelled: () -> Unit, progress: (Long) -> Unit) {
        val part = File(staging, "$name.part")
        val digest = MessageDigest.getInstance("SHA-256")
        val have = if (part.isFile && part.length() <= entry.bytes) part.length() else 0L
        if (have > 0) part.inputStream().use { input -> copyBlocks(input.buffered(), null, digest, checkCancelled) {} }
        if (have < entry.bytes || entry.bytes == 0L) {
            fetchInto(part, "$base/$name", have, digest, checkCancelled) { n -> progress(n) }
        }
        val size = part.length()
        if (size != entry.bytes) {
            throw BundleException("$base/$name: got $size bytes, manifest says ${entry.bytes}")
        }
        val sha = digest.digest().toHex()
        if (!sha.equals(entry.sha256, ignoreCase = true)) {
            part.delete()
            throw BundleException("$base/$name: sha256 $sha does not match the manifest")
        }
        val target = File(staging, name)
        if (target.exists() && !target.delete() || !part.renameTo(target)) {
            throw BundleException("$target: cannot rename the finished download")
        }
    }

    /** Append `url` from byte [have] on (or all of it, when the server ignores Range) to [part]. */
    private fun fetchInto(
        part: File,
        url: String,
        have: Long,
        digest: MessageDigest,
        checkCancelled: () -> Unit,
        progress: (Long) -> Unit,
    ) {
        val connection = open(url, if (have > 0) have else null)
        try {
            val code = connection.responseCode
            val append = have > 0 && code == HttpURLConnection.HTTP_PARTIAL
            if (code != HttpURLConnection.HTTP_OK && !append) throw BundleException("$url: HTTP $code")
            if (!append) digest.reset()  // a full response: start the file over
            val start = if (append) have else 0L
            FileOutputStream(part, append).use { out ->
                connection.inputStream.use { input ->
                    copyBlocks(input, out, digest, checkCancelled) { n -> progress(start + n) }
                }
            }
        } finally {
            connection.disconnect()
        }
    }

    private fun isComplete(file: File, entry: FileEntry): Boolean {
        if (!file.isFile || file.length() != entry.bytes) return false
        return file.inputStream().use { sha256(it.buffered()) }.equals(entry.sha256, ignoreCase = true)
    }

    private fun fetchText(url: String): String {
        val connection = open(url, null)
        try {
            val code = connection.responseCode
            if (code != HttpURLConnection.HTTP_OK) throw BundleException("$url: HTTP $code")
            return connection.inputStream.use { it.readBytes().toString(Charsets.UTF_8) }
        } finally {
            connection.disconnect()
        }
    }

    private fun open(url: String, from: Long?): HttpURLConnection {
        val connection = try {
            URL(url).openConnection() as HttpURLConnection
        } catch (e: IOException) {
            throw BundleException("$url: ${e.message}")
        }
        connection.connectTimeout = 15_000
        connection.readTimeout = 60_000
        if (from != null) connection.setRequestProperty("Range", "bytes=$from-")
        return connection
    }

    companion object {
        const val MANIFEST = "manifest.json"
        private const val BLOCK = 1 shl 20
        private val SAFE_NAME = Regex("""[A-Za-z0-9][A-Za-z0-9._-]*""")

        /** Manifest names become file names: no folders, no `..`, nothing odd. */
        fun checkName(name: String) {
            if (!SAFE_NAME.matches(name) || name.endsWith(".part") || name == MANIFEST) {
                throw BundleException("manifest lists an unsafe file name: '$name'")
            }
        }

        fun sha256(input: java.io.InputStream): String {
            val digest = MessageDigest.getInstance("SHA-256")
            copyBlocks(input, null, digest, {}) {}
            return digest.digest().toHex()
        }

        /** Write to `name.tmp`, then rename: readers never see half a file. */
        fun writeAtomically(target: File, bytes: ByteArray) {
            val tmp = File(target.parentFile, target.name + ".tmp")
            tmp.writeBytes(bytes)
            if (target.exists() && !target.delete() || !tmp.renameTo(target)) {
                throw BundleException("$target: cannot write")
            }
        }

        private fun copyBlocks(
            input: java.io.InputStream,
            out: java.io.OutputStream?,
            digest: MessageDigest,
            checkCancelled: () -> Unit,
            progress: (Long) -> Unit,
        ) {
            val buffer = ByteArray(BLOCK)
            var total = 0L
            while (true) {
                checkCancelled()
                val n = input.read(buffer)
                if (n < 0) break
                digest.update(buffer, 0, n)
                out?.write(buffer, 0, n)
                total += n
                progress(total)
            }
        }

        private fun ByteArray.toHex(): String = joinToString("") { "%02x".format(it) }
    }
}
