package ai.qwenvledge.demo

import com.sun.net.httpserver.HttpServer
import org.junit.After
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Before
import org.junit.Rule
import org.junit.Test
import org.junit.rules.TemporaryFolder
import java.io.ByteArrayInputStream
import java.io.File
import java.net.InetAddress
import java.net.InetSocketAddress
import java.util.Collections
import kotlin.random.Random

/** BundleDownloader against a real HTTP server on loopback that serves a folder, with Range support. */
class BundleDownloaderTest {
    @get:Rule
    val tmp = TemporaryFolder()

    private lateinit var served: File
    private lateinit var server: HttpServer
    private val ranges: MutableList<String> = Collections.synchronizedList(mutableListOf())
    private var honourRange = true

    private val vision = Random(1).nextBytes(3_000_000)
    private val llm = Random(2).nextBytes(1_234_567)
    private lateinit var files: Map<String, FileEntry>

    @Before
    fun serve() {
        served = tmp.newFolder("served")
        File(served, "vision.onnx").writeBytes(vision)
        File(served, "llm.gguf").writeBytes(llm)
        files = listOf("vision.onnx", "llm.gguf").associateWith { name ->
            val bytes = File(served, name).readBytes()
            FileEntry(bytes.size.toLong(), BundleDownloader.sha256(ByteArrayInputStream(bytes)))
        }
        File(served, "manifest.json").writeText("""{"format": "qwenvl-edge-bundle"}""")
        server = HttpServer.create(InetSocketAddress(InetAddress.getLoopbackAddress(), 0), 0)
        server.createContext("/bundle/") { exchange ->
            val file = File(served, exchange.requestURI.path.removePrefix("/bundle/"))
            val range = exchange.requestHeaders.getFirst("Range")
            if (!file.isFile) {
                exchange.sendResponseHeaders(404, -1)
            } else {
                val all = file.readBytes()
                if (range != null && honourRange) {
                    ranges += range
                    val from = range.removePrefix("bytes=").removeSuffix("-").toInt()
                    exchange.sendResponseHeaders(206, (all.size - from).toLong())
                    exchange.responseBody.write(all, from, all.size - from)
                } else {
                    exchange.sendResponseHeaders(200, all.size.toLong())
                    exchange.responseBody.write(all)
                }
            }
            exchange.close()
        }
        server.start()
    }

    @After
    fun stop() = server.stop(0)

    private val url get() = "http://127.0.0.1:${server.address.port}/bundle/"

    private fun downloader(into: File, entries: Map<String, FileEntry> = files) =
        BundleDownloader(url, into) { text ->
            assertTrue(text.contains("qwenvl-edge-bundle"))
            entries
        }

    @Test
    fun downloadsEveryFileThenTheManifest() {
        val into = File(tmp.root, "staging")
        val seen = mutableListOf<DownloadProgress>()
        downloader(into).download(onProgress = { seen += it }, checkCancelled = {})
        assertArrayEquals(vision, File(into, "vision.onnx").readBytes())
        assertArrayEquals(llm, File(into, "llm.gguf").readBytes())
        assertTrue(File(into, "manifest.json").isFile)
        assertEquals(setOf("llm.gguf", "manifest.json", "vision.onnx"), into.list()!!.toSet())
        val total = (vision.size + llm.size).toLong()
        assertEquals(DownloadProgress("manifest.json", total, total), seen.last())
        assertTrue(seen.zipWithNext().all { (a, b) -> a.doneBytes <= b.doneBytes })
    }

    @Test
    fun resumesAPartialFileWithARangeRequest() {
        val into = tmp.newFolder("resume")
        File(into, "vision.onnx.part").writeBytes(vision.copyOf(1_000_000))
        downloader(into).download(onProgress = {}, checkCancelled = {})
        assertEquals(listOf("bytes=1000000-"), ranges)
        assertArrayEquals(vision, File(into, "vision.onnx").readBytes())
    }

    @Test
    fun startsOverWhenTheServerIgnoresRange() {
        honourRange = false
        val into = tmp.newFolder("norange")
        File(into, "vision.onnx.part").writeBytes(ByteArray(1_000_000))  // wrong bytes: must be replaced
        downloader(into).download(onProgress = {}, checkCancelled = {})
        assertArrayEquals(vision, File(into, "vision.onnx").readBytes())
    }

    @Test
    fun aWrongChecksumLeavesNoFileAndNoManifest() {
        val into = File(tmp.root, "bad")
        val lying = files + ("llm.gguf" to files.getValue("llm.gguf").copy(sha256 = "00".repeat(32)))
        try {
            downloader(into, lying).download(onProgress = {}, checkCancelled = {})
            fail("a corrupt download was accepted")
        } catch (e: BundleException) {
            assertTrue(e.message!!, e.message!!.contains("llm.gguf: sha256"))
        }
        assertFalse(File(into, "llm.gguf").exists())
        assertFalse(File(into, "llm.gguf.part").exists())
        assertFalse(File(into, "manifest.json").exists())
    }

    @Test
    fun unsafeNamesAndMissingFilesAreRefused() {
        for (name in listOf("../evil", "a/b", ".hidden", "x.part", "manifest.json")) {
            try {
                BundleDownloader(url, File(tmp.root, "unsafe")) { mapOf(name to FileEntry(1, "00")) }
                    .download(onProgress = {}, checkCancelled = {})
                fail("accepted $name")
            } catch (e: BundleException) {
                assertTrue(e.message!!, e.message!!.contains("unsafe file name"))
            }
        }
        try {
            downloader(File(tmp.root, "missing"), mapOf("nope.bin" to FileEntry(1, "00")))
                .download(onProgress = {}, checkCancelled = {})
            fail("accepted a 404")
        } catch (e: BundleException) {
            assertTrue(e.message!!, e.message!!.endsWith("nope.bin: HTTP 404"))
        }
    }

    @Test
    fun cancellingStopsTheTransfer() {
        val into = File(tmp.root, "cancel")
        var blocks = 0
        try {
            downloader(into).download(onProgress = {}, checkCancelled = { if (++blocks > 2) throw InterruptedException() })
            fail("not cancelled")
        } catch (e: InterruptedException) {
            assertFalse(File(into, "manifest.json").exists())
        }
    }
}
