package ai.qwenvledge.demo

import android.app.Application
import android.graphics.Bitmap
import android.net.Uri
import android.util.Log
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.currentCoroutineContext
import kotlinx.coroutines.ensureActive
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicBoolean

/** One question and its (possibly still growing) answer. */
data class Turn(
    val question: String,
    val answer: String = "",
    val boxes: List<GroundingBox> = emptyList(),
    val done: Boolean = false,
    val note: String? = null,  // timing, or why it stopped
)

data class Settings(
    val nThreads: Int = Runtime.getRuntime().availableProcessors().coerceIn(1, 4),
    val maxTokens: Int = 512,
    val greedy: Boolean = false,
    /** Free the vision model once an image is encoded: its memory goes to the decoder on small phones. */
    val releaseVisionBeforeDecode: Boolean = true,
    /** 8-bit KV cache (QWENVL_KV_Q8_0): half the KV memory, the recommended phone setting; off: f16. */
    val kvQ8: Boolean = true,
    /** Map llm.gguf as it is (no repacking): slower kernels, weights the OS can drop; off: read + repack. */
    val mapWeights: Boolean = false,
) {
    val kvType: String get() = if (kvQ8) "q8_0" else "f16"
}

data class UiState(
    val bundle: BundleInfo? = null,
    val bundlePlaces: List<String> = emptyList(),
    val busy: String? = null,  // what is running (loading, encoding, downloading), null when idle
    val error: String? = null,
    val download: DownloadProgress? = null,
    val photo: Bitmap? = null,
    val turns: List<Turn> = emptyList(),
    val generating: Boolean = false,
    val settings: Settings = Settings(),
) {
    /** Boxes to draw over the photo: those of the latest answer that has any. */
    val boxes: List<GroundingBox> get() = turns.lastOrNull { it.boxes.isNotEmpty() }?.boxes.orEmpty()
    val ready: Boolean get() = bundle != null && busy == null && !generating
}

/**
 * The app's state and its work, off the main thread:
 * - photo decoding and the vision step (native: preprocessing + vision.onnx) on Dispatchers.Default;
 * - every decoder call on one dedicated thread (a native session is single-threaded);
 * - tokens stream into [state] from the decoder's callback as they come.
 */
class ChatViewModel(application: Application) : AndroidViewModel(application) {
    private val store = BundleStore(application)
    private val resolver = application.contentResolver
    private val decoderThread = Executors.newSingleThreadExecutor { r -> Thread(r, "qwenvl-decoder") }
    private val decoderDispatcher = decoderThread.asCoroutineDispatcher()

    private val _state = MutableStateFlow(UiState(bundlePlaces = store.candidates().map { it.path }))
    val state: StateFlow<UiState> = _state.asStateFlow()

    private var decoder: QwenDecoder? = null  // touched on decoderThread only
    private var vision: QwenVision? = null  // touched on Dispatchers.Default under visionLock
    private val visionLock = Any()

    @Volatile private var photoUri: Uri? = null
    @Volatile private var photoInChat = false  // the current photo's rows are already in the decoder's KV cache
    @Volatile private var cachedRows: Pair<Uri, FloatArray>? = null  // the last photo's vision rows (4 MB at 7B)
    private val stopRequested = AtomicBoolean(false)
    private var work: Job? = null

    init {
        loadBundle()
    }

    fun loadBundle() = launchWork("Loading the model") { openBundle() }

    /** Fetch a bundle folder from [url] into app storage (resumable), then load it. */
    fun downloadBundle(url: String) = launchWork("Downloading the bundle") {
        closeModels()
        _state.update { it.copy(bundle = null) }
        val job = currentCoroutineContext()[Job]
        withContext(Dispatchers.IO) {
            store.download(
                url,
                onProgress = { p -> _state.update { it.copy(download = p) } },
                checkCancelled = { job?.ensureActive() },
            )
        }
        _state.update { it.copy(download = null, busy = "Loading the model") }
        openBundle()
    }

    private suspend fun openBundle() {
        closeModels()
        val bundle = withContext(Dispatchers.IO) { store.open() }
        val settings = _state.value.settings
        withContext(decoderDispatcher) {
            val opened = QwenDecoder.open(bundle.llmFile, bundle.seqLength, settings.nThreads, settings.kvType,
                settings.mapWeights)
            if (opened.embeddingSize != bundle.hiddenSize) {
                opened.close()
                throw BundleException(
                    "${bundle.llmFile}: embedding size ${opened.embeddingSize}, manifest hidden_size ${bundle.hiddenSize}"
                )
            }
            decoder = opened
        }
        photoInChat = false
        cachedRows = null
        _state.update { it.copy(bundle = bundle, turns = emptyList()) }
    }

    fun cancelWork() {
        work?.cancel()
        stopRequested.set(true)
    }

    fun setPhoto(uri: Uri) = launchWork("Opening the photo") {
        val preview = withContext(Dispatchers.IO) { PhotoLoader.decodePreview(resolver, uri) }
        photoUri = uri
        newChatOnDecoderThread()
        _state.update { it.copy(photo = preview, turns = emptyList()) }
    }

    fun newChat() = launchWork("Starting over") {
        newChatOnDecoderThread()
        _state.update { it.copy(turns = emptyList()) }
    }

    fun updateSettings(settings: Settings) {
        val old = _state.value.settings
        val reload = settings.nThreads != old.nThreads || settings.kvQ8 != old.kvQ8 || settings.mapWeights != old.mapWeights
        _state.update { it.copy(settings = settings) }
        if (reload && _state.value.bundle != null) loadBundle()
    }

    fun ask(question: String) {
        val current = _state.value
        val bundle = current.bundle ?: return
        if (question.isBlank() || !current.ready) return
        stopRequested.set(false)
        _state.update { it.copy(turns = it.turns + Turn(question.trim()), generating = true, error = null) }
        work = viewModelScope.launch {
            try {
                val images = if (photoUri != null && !photoInChat) listOf(encodePhoto(bundle)) else emptyList()
                if (current.settings.releaseVisionBeforeDecode) closeVision()
                val settings = current.settings
                val started = System.nanoTime()
                var pieces = 0
                val answer = withContext(decoderDispatcher) {
                    val session = decoder ?: throw BundleException("the model is not loaded")
                    session.generate(
                        images, question.trim(), settings.maxTokens,
                        temperature = if (settings.greedy) 0f else 1f, topP = bundle.topP,
                    ) { piece ->
                        pieces++
                        updateLastTurn { turn ->
                            val grown = turn.answer + piece
                            turn.copy(answer = grown, boxes = BoxParser.parse(grown))
                        }
                        !stopRequested.get()
                    }
                }
                if (images.isNotEmpty()) photoInChat = true
                val seconds = (System.nanoTime() - started) / 1e9
                val stopped = if (stopRequested.get()) ", stopped" else ""
                val note = "%d tokens in %.1f s%s".format(pieces, seconds, stopped)
                updateLastTurn { it.copy(answer = answer, boxes = BoxParser.parse(answer), done = true, note = note) }
            } catch (e: Exception) {
                Log.e(TAG, "generate failed", e)
                updateLastTurn { it.copy(done = true, note = "failed: ${e.message}") }
                _state.update { it.copy(error = e.message ?: e.toString()) }
            } finally {
                _state.update { it.copy(generating = false) }
            }
        }
    }

    fun stopGenerating() = stopRequested.set(true)

    fun dismissError() = _state.update { it.copy(error = null) }

    /** Photo -> rows in the native core (Pillow-exact resize, mean/std, vision.onnx), off the main thread. */
    private suspend fun encodePhoto(bundle: BundleInfo): FloatArray = withContext(Dispatchers.Default) {
        val uri = checkNotNull(photoUri)
        cachedRows?.let { (cachedUri, rows) -> if (cachedUri == uri) return@withContext rows }
        _state.update { it.copy(busy = "Encoding the photo") }
        try {
            val pixels = PhotoLoader.decodePixels(resolver, uri)
            synchronized(visionLock) {
                val encoder = vision ?: QwenVision.open(bundle, _state.value.settings.nThreads).also { vision = it }
                encoder.encode(pixels, bundle.imageMean, bundle.imageStd)  // (n_queries * hidden) float32
            }.also { rows -> cachedRows = uri to rows }
        } finally {
            _state.update { it.copy(busy = null) }
        }
    }

    private suspend fun newChatOnDecoderThread() {
        withContext(decoderDispatcher) { decoder?.resetChat() }
        photoInChat = false
    }

    private fun updateLastTurn(change: (Turn) -> Turn) = _state.update { s ->
        if (s.turns.isEmpty()) s else s.copy(turns = s.turns.dropLast(1) + change(s.turns.last()))
    }

    private fun closeVision() = synchronized(visionLock) {
        vision?.close()
        vision = null
    }

    private suspend fun closeModels() {
        closeVision()
        withContext(decoderDispatcher) {
            decoder?.close()
            decoder = null
        }
    }

    /** Run [block] as the one piece of background work, its name shown while it runs, errors shown after. */
    private fun launchWork(what: String, block: suspend () -> Unit) {
        if (work?.isActive == true) return
        _state.update { it.copy(busy = what, error = null) }
        work = viewModelScope.launch {
            try {
                block()
            } catch (e: kotlinx.coroutines.CancellationException) {
                _state.update { it.copy(error = "$what: cancelled") }
            } catch (e: Exception) {
                Log.e(TAG, what, e)
                _state.update { it.copy(error = "$what: ${e.message ?: e}") }
            } finally {
                _state.update { it.copy(busy = null, download = null) }
            }
        }
    }

    override fun onCleared() {
        closeVision()
        // The native session is freed on its own thread, after a running generate returns (it stops
        // at the next token); the main thread does not wait for it.
        stopRequested.set(true)
        decoderThread.execute {
            decoder?.close()
            decoder = null
        }
        decoderThread.shutdown()
    }

    companion object {
        private const val TAG = "QwenVL"
    }
}
