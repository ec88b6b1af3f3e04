package ai.qwenvledge.demo.ui

import ai.qwenvledge.demo.GroundingBox
import android.graphics.Bitmap
import androidx.compose.foundation.Canvas
import androidx.compose.foundation.Image
import androidx.compose.foundation.layout.Box
import androidx.compose.foundation.layout.aspectRatio
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.heightIn
import androidx.compose.runtime.Composable
import androidx.compose.runtime.remember
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.geometry.Offset
import androidx.compose.ui.geometry.Size
import androidx.compose.ui.graphics.Color
import androidx.compose.ui.graphics.asImageBitmap
import androidx.compose.ui.graphics.drawscope.Stroke
import androidx.compose.ui.layout.ContentScale
import androidx.compose.ui.text.TextStyle
import androidx.compose.ui.text.drawText
import androidx.compose.ui.text.rememberTextMeasurer
import androidx.compose.ui.unit.Dp
import androidx.compose.ui.unit.dp
import androidx.compose.ui.unit.sp

/** The same colours, in the same order, as the Python runtime's drawings (runtime/boxes.py). */
private val BOX_COLORS = listOf(
    Color(0xFFE6194B), Color(0xFF3CB44B), Color(0xFF4363D8), Color(0xFFF58231),
    Color(0xFF911EB4), Color(0xFF42D4F4), Color(0xFFF032E6), Color(0xFF9A6324),
)

/**
 * The photo, shown whole (aspect ratio kept), with each grounding box outlined and labelled.
 * The inner box has exactly the photo's aspect ratio, so a corner at (x, y) in 0..1000 lands at
 * (x / 1000 * width, y / 1000 * height) of the drawing, whatever the screen size.
 */
@Composable
fun PhotoWithBoxes(photo: Bitmap, boxes: List<GroundingBox>, modifier: Modifier = Modifier, maxHeight: Dp = 360.dp) {
    val image = remember(photo) { photo.asImageBitmap() }
    val measurer = rememberTextMeasurer()
    Box(modifier.fillMaxWidth().heightIn(max = maxHeight), contentAlignment = Alignment.Center) {
        Box(Modifier.aspectRatio(photo.width.toFloat() / photo.height)) {
            Image(
                bitmap = image,
                contentDescription = "the photo",
                contentScale = ContentScale.FillBounds,
                modifier = Modifier.matchParentSize(),
            )
            Canvas(Modifier.matchParentSize()) {
                val stroke = 3.dp.toPx()
                boxes.forEachIndexed { i, box ->
                    val (left, top, right, bottom) = box.toPixels(size.width, size.height)
                    val color = BOX_COLORS[i % BOX_COLORS.size]
                    drawRect(color, Offset(left, top), Size(right - left, bottom - top), style = Stroke(stroke))
                    if (box.label.isNotEmpty()) {
                        val text = measurer.measure(box.label, TextStyle(color = Color.White, fontSize = 12.sp))
                        val labelSize = Size(text.size.width + 2 * stroke, text.size.height.toFloat())
                        val labelTop = (top - labelSize.height).coerceAtLeast(0f)
                        drawRect(color, Offset(left, labelTop), labelSize)
                        drawText(text, topLeft = Offset(left + stroke, labelTop))
                    }
                }
            }
        }
    }
}
