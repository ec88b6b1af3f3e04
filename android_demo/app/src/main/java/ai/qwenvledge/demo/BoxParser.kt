package ai.qwenvledge.demo

/**
 * One grounded phrase of a reply: its label and the model's corners, integers 0..1000 relative to
 * the photo as the user gave it (before the square resize), so they map straight onto the photo.
 */
data class GroundingBox(val label: String, val x1: Int, val y1: Int, val x2: Int, val y2: Int) {
    /** (left, top, right, bottom) in pixels of a width x height drawing of the photo, corners ordered. */
    fun toPixels(width: Float, height: Float): FloatArray {
        val ax = x1 / 1000f * width
        val bx = x2 / 1000f * width
        val ay = y1 / 1000f * height
        val by = y2 / 1000f * height
        return floatArrayOf(minOf(ax, bx), minOf(ay, by), maxOf(ax, bx), maxOf(ay, by))
    }
}

/**
 * Qwen-VL grounding output, `<ref>label</ref><box>(x1,y1),(x2,y2)</box>`, read the way the Python
 * runtime reads it (runtime/boxes.py): a `<box>` without its own `<ref>` takes the last label seen
 * (the model writes several boxes for one phrase that way); corners are clamped to 0..1000.
 */
object BoxParser {
    private val TOKEN = Regex(
        """<ref>(.*?)</ref>|<box>\s*\((-?\d+)\s*,\s*(-?\d+)\)\s*,\s*\((-?\d+)\s*,\s*(-?\d+)\)\s*</box>""",
        RegexOption.DOT_MATCHES_ALL,
    )
    private val REF = Regex("""<ref>(.*?)</ref>""", RegexOption.DOT_MATCHES_ALL)
    private val BOX_OR_QUAD = Regex("""<box>.*?</box>|<quad>.*?</quad>""", RegexOption.DOT_MATCHES_ALL)
    private val UNFINISHED_TAIL = Regex("""(<box>|<quad>)[^<]*$""")  // a box still streaming in
    private val STRAY_TAG = Regex("""</?(ref|box|quad)>""")

    /** Every complete box in [text], in order. */
    fun parse(text: String): List<GroundingBox> {
        val boxes = mutableListOf<GroundingBox>()
        var label = ""
        for (m in TOKEN.findAll(text)) {
            val ref = m.groups[1]
            if (ref != null) {
                label = ref.value.trim()
                continue
            }
            val (x1, y1, x2, y2) = (2..5).map { corner(m.groupValues[it]) }
            boxes += GroundingBox(label, x1, y1, x2, y2)
        }
        return boxes
    }

    /** [text] for reading: `<ref>dog</ref><box>...</box>` shows as `dog`; tags and coordinates go. */
    fun displayText(text: String): String {
        val noBoxes = BOX_OR_QUAD.replace(text, "")
        val labels = REF.replace(noBoxes) { it.groupValues[1] }
        return STRAY_TAG.replace(UNFINISHED_TAIL.replace(labels, ""), "")
    }

    /** A corner as the model wrote it, clamped to 0..1000 (digits too long for an Int clamp too). */
    private fun corner(digits: String): Int {
        val value = digits.toIntOrNull() ?: if (digits.startsWith("-")) 0 else 1000
        return value.coerceIn(0, 1000)
    }
}
