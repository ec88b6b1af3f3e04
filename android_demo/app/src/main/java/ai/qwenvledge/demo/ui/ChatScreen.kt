package ai.qwenvledge.demo.ui

import ai.qwenvledge.demo.BoxParser
import ai.qwenvledge.demo.ChatViewModel
import ai.qwenvledge.demo.Settings
import ai.qwenvledge.demo.Turn
import ai.qwenvledge.demo.UiState
import android.content.Context
import android.net.Uri
import androidx.activity.compose.rememberLauncherForActivityResult
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.height
import androidx.compose.foundation.layout.imePadding
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.foundation.lazy.rememberLazyListState
import androidx.compose.material3.AlertDialog
import androidx.compose.material3.Button
import androidx.compose.material3.Card
import androidx.compose.material3.CardDefaults
import androidx.compose.material3.ExperimentalMaterial3Api
import androidx.compose.material3.LinearProgressIndicator
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Scaffold
import androidx.compose.material3.Slider
import androidx.compose.material3.Switch
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.material3.TopAppBar
import androidx.compose.runtime.Composable
import androidx.compose.runtime.LaunchedEffect
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.saveable.rememberSaveable
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.platform.LocalContext
import androidx.compose.ui.unit.dp
import androidx.core.content.FileProvider
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import java.io.File
import kotlin.math.roundToInt

@OptIn(ExperimentalMaterial3Api::class)
@Composable
fun ChatScreen(viewModel: ChatViewModel) {
    val state by viewModel.state.collectAsStateWithLifecycle()
    val context = LocalContext.current
    var showSettings by remember { mutableStateOf(false) }
    var cameraUri by rememberSaveable { mutableStateOf<Uri?>(null) }

    val pickPhoto = rememberLauncherForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri ->
        uri?.let(viewModel::setPhoto)
    }
    val takePhoto = rememberLauncherForActivityResult(ActivityResultContracts.TakePicture()) { saved ->
        if (saved) cameraUri?.let(viewModel::setPhoto)
    }

    Scaffold(
        topBar = {
            TopAppBar(
                title = { Text("Qwen-VL Edge") },
                actions = {
                    TextButton(onClick = viewModel::newChat, enabled = state.ready) { Text("New chat") }
                    TextButton(onClick = { showSettings = true }) { Text("Settings") }
                },
            )
        },
    ) { padding ->
        Column(
            Modifier.fillMaxSize().padding(padding).imePadding().padding(horizontal = 12.dp),
            verticalArrangement = Arrangement.spacedBy(8.dp),
        ) {
            state.error?.let { ErrorCard(it, onDismiss = viewModel::dismissError) }
            if (state.bundle == null && state.busy == null) {
                BundlePanel(state, onDownload = viewModel::downloadBundle, onRetry = viewModel::loadBundle)
            }
            BusyBar(state, onCancel = viewModel::cancelWork)

            state.photo?.let { PhotoWithBoxes(it, state.boxes) }
            Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                val canChangePhoto = state.busy == null && !state.generating
                OutlinedButton(
                    onClick = { pickPhoto.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly)) },
                    enabled = canChangePhoto,
                ) { Text("Pick photo") }
                OutlinedButton(
                    onClick = {
                        val uri = newCameraUri(context)
                        cameraUri = uri
                        takePhoto.launch(uri)
                    },
                    enabled = canChangePhoto,
                ) { Text("Take photo") }
            }

            val listState = rememberLazyListState()
            val lastLength = state.turns.lastOrNull()?.answer?.length ?: 0
            LaunchedEffect(state.turns.size, lastLength) {
                if (state.turns.isNotEmpty()) listState.scrollToItem(state.turns.size - 1)
            }
            LazyColumn(Modifier.weight(1f).fillMaxWidth(), state = listState) {
                items(state.turns) { TurnItem(it) }
            }

            QuestionBar(
                enabled = state.ready,
                generating = state.generating,
                onAsk = viewModel::ask,
                onStop = viewModel::stopGenerating,
            )
            Spacer(Modifier.height(4.dp))
        }
    }

    if (showSettings) {
        SettingsDialog(
            settings = state.settings,
            onDismiss = { showSettings = false },
            onApply = {
                showSettings = false
                viewModel.updateSettings(it)
            },
        )
    }
}

/** Where the camera app writes the photo: a fresh file in our cache, shared through FileProvider. */
private fun newCameraUri(context: Context): Uri {
    val folder = File(context.cacheDir, "camera").apply { mkdirs() }
    folder.listFiles()?.forEach { it.delete() }  // keep only the newest photo
    val file = File(folder, "photo-${System.currentTimeMillis()}.jpg")
    return FileProvider.getUriForFile(context, "${context.packageName}.fileprovider", file)
}

@Composable
private fun TurnItem(turn: Turn) {
    Column(Modifier.fillMaxWidth().padding(vertical = 6.dp)) {
        Text(turn.question, style = MaterialTheme.typography.titleSmall)
        val answer = BoxParser.displayText(turn.answer)
        Text(if (answer.isEmpty() && !turn.done) "…" else answer, style = MaterialTheme.typography.bodyMedium)
        turn.note?.let {
            Text(it, style = MaterialTheme.typography.bodySmall, color = MaterialTheme.colorScheme.onSurfaceVariant)
        }
    }
}

@Composable
private fun QuestionBar(enabled: Boolean, generating: Boolean, onAsk: (String) -> Unit, onStop: () -> Unit) {
    var question by rememberSaveable { mutableStateOf("") }
    Row(verticalAlignment = Alignment.CenterVertically, horizontalArrangement = Arrangement.spacedBy(8.dp)) {
        OutlinedTextField(
            value = question,
            onValueChange = { question = it },
            modifier = Modifier.weight(1f),
            placeholder = { Text("Ask about the photo, e.g. where is the dog?") },
            maxLines = 4,
        )
        if (generating) {
            Button(onClick = onStop) { Text("Stop") }
        } else {
            Button(
                onClick = {
                    onAsk(question)
                    question = ""
                },
                enabled = enabled && question.isNotBlank(),
            ) { Text("Ask") }
        }
    }
}

@Composable
private fun BusyBar(state: UiState, onCancel: () -> Unit) {
    val busy = state.busy ?: return
    Column(Modifier.fillMaxWidth()) {
        val download = state.download
        if (download != null && download.totalBytes > 0) {
            LinearProgressIndicator(
                progress = { download.doneBytes.toFloat() / download.totalBytes },
                modifier = Modifier.fillMaxWidth(),
            )
            Text("${download.file}: ${download.doneBytes shr 20} / ${download.totalBytes shr 20} MiB")
        } else {
            LinearProgressIndicator(Modifier.fillMaxWidth())
        }
        Row(verticalAlignment = Alignment.CenterVertically) {
            Text(busy, Modifier.weight(1f), style = MaterialTheme.typography.bodySmall)
            if (download != null) TextButton(onClick = onCancel) { Text("Cancel") }
        }
    }
}

@Composable
private fun ErrorCard(message: String, onDismiss: () -> Unit) {
    Card(colors = CardDefaults.cardColors(containerColor = MaterialTheme.colorScheme.errorContainer)) {
        Row(Modifier.padding(8.dp), verticalAlignment = Alignment.CenterVertically) {
            Text(message, Modifier.weight(1f), color = MaterialTheme.colorScheme.onErrorContainer)
            TextButton(onClick = onDismiss) { Text("OK") }
        }
    }
}

/** No bundle yet: where to put one with adb, or a URL to download one from. */
@Composable
private fun BundlePanel(state: UiState, onDownload: (String) -> Unit, onRetry: () -> Unit) {
    var url by rememberSaveable { mutableStateOf("") }
    Card {
        Column(Modifier.padding(12.dp), verticalArrangement = Arrangement.spacedBy(6.dp)) {
            Text("No model bundle", style = MaterialTheme.typography.titleMedium)
            Text(
                "Copy a bundle folder (manifest.json, vision.onnx, llm.gguf) to one of these folders " +
                    "(see android_demo/README.md), then tap Reload:",
                style = MaterialTheme.typography.bodySmall,
            )
            state.bundlePlaces.forEach { Text(it, style = MaterialTheme.typography.bodySmall) }
            OutlinedTextField(
                value = url,
                onValueChange = { url = it },
                modifier = Modifier.fillMaxWidth(),
                label = { Text("or download from a bundle folder URL") },
                singleLine = true,
            )
            Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                Button(onClick = { onDownload(url) }, enabled = state.busy == null && url.isNotBlank()) { Text("Download") }
                OutlinedButton(onClick = onRetry, enabled = state.busy == null) { Text("Reload") }
            }
        }
    }
}

@Composable
private fun SettingsDialog(settings: Settings, onDismiss: () -> Unit, onApply: (Settings) -> Unit) {
    var draft by remember { mutableStateOf(settings) }
    AlertDialog(
        onDismissRequest = onDismiss,
        title = { Text("Settings") },
        confirmButton = { TextButton(onClick = { onApply(draft) }) { Text("Apply") } },
        dismissButton = { TextButton(onClick = onDismiss) { Text("Cancel") } },
        text = {
            Column(verticalArrangement = Arrangement.spacedBy(4.dp)) {
                Text("CPU threads: ${draft.nThreads} (reloads the model)")
                Slider(
                    value = draft.nThreads.toFloat(),
                    onValueChange = { draft = draft.copy(nThreads = it.roundToInt()) },
                    valueRange = 1f..8f,
                    steps = 6,
                )
                Text("Longest answer: ${draft.maxTokens} tokens")
                Slider(
                    value = draft.maxTokens.toFloat(),
                    onValueChange = { draft = draft.copy(maxTokens = (it / 64).roundToInt() * 64) },
                    valueRange = 64f..1024f,
                )
                SwitchRow("Greedy decoding (temperature 0)", draft.greedy) { draft = draft.copy(greedy = it) }
                SwitchRow("Free the vision model before decoding (phones with little memory)", draft.releaseVisionBeforeDecode) {
                    draft = draft.copy(releaseVisionBeforeDecode = it)
                }
                SwitchRow("8-bit KV cache, q8_0 (half its memory; reloads the model)", draft.kvQ8) {
                    draft = draft.copy(kvQ8 = it)
                }
                SwitchRow("Map the model file instead of reading it (reloads the model)", draft.mapWeights) {
                    draft = draft.copy(mapWeights = it)
                }
            }
        },
    )
}

@Composable
private fun SwitchRow(label: String, checked: Boolean, onChange: (Boolean) -> Unit) {
    Row(verticalAlignment = Alignment.CenterVertically) {
        Text(label, Modifier.weight(1f))
        Switch(checked = checked, onCheckedChange = onChange)
    }
}
