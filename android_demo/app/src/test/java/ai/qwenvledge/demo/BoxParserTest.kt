package ai.qwenvledge.demo

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Test

/** The same cases as the Python runtime's box tests (tests/test_runtime.py), plus streaming text. */
class BoxParserTest {
    @Test
    fun oneBoxScalesToThePhoto() {
        val boxes = BoxParser.parse("<ref>x</ref><box>(100,200),(300,400)</box>")
        assertEquals(listOf(GroundingBox("x", 100, 200, 300, 400)), boxes)
        assertArrayEquals(floatArrayOf(64f, 85.4f, 192f, 170.8f), boxes[0].toPixels(640f, 427f), 1e-3f)
    }

    @Test
    fun severalBoxesShareTheLastLabelAndUnfinishedOnesAreSkipped() {
        val text = "<ref>cats</ref><box>(0,0),(10,10)</box><box>(20,20),(1000,1000)</box> <box>(1,2),(3,4)"
        val boxes = BoxParser.parse(text)
        assertEquals(listOf("cats", "cats"), boxes.map { it.label })
        assertArrayEquals(floatArrayOf(2f, 2f, 100f, 100f), boxes[1].toPixels(100f, 100f), 0f)
    }

    @Test
    fun cornersAreClampedAndOrdered() {
        val text = "<box>(1200, -5) , (30,99999999999999)</box>"
        assertEquals(listOf(GroundingBox("", 1000, 0, 30, 1000)), BoxParser.parse(text))
        assertArrayEquals(floatArrayOf(3f, 0f, 100f, 100f), BoxParser.parse(text)[0].toPixels(100f, 100f), 0f)
    }

    @Test
    fun labelsMayHoldSpacesNewlinesAndChinese() {
        val boxes = BoxParser.parse("<ref> 红色的\n车 </ref><box>(1,2),(3,4)</box>")
        assertEquals("红色的\n车", boxes.single().label)
    }

    @Test
    fun displayTextKeepsLabelsAndDropsCoordinates() {
        val text = "The <ref>dog</ref><box>(1,2),(3,4)</box> sits by the <ref>door</ref><box>(5,6),(7,8)</box>."
        assertEquals("The dog sits by the door.", BoxParser.displayText(text))
    }

    @Test
    fun displayTextHidesABoxStillStreamingIn() {
        assertEquals("The dog", BoxParser.displayText("The <ref>dog</ref><box>(12,3"))
        assertEquals("The do", BoxParser.displayText("The <ref>do"))
        assertEquals(emptyList<GroundingBox>(), BoxParser.parse("The <ref>dog</ref><box>(12,3"))
    }

    @Test
    fun plainTextIsLeftAlone() {
        val text = "2 < 3 and 4 > 1, (1,2),(3,4) is not a box"
        assertEquals(text, BoxParser.displayText(text))
        assertEquals(emptyList<GroundingBox>(), BoxParser.parse(text))
    }
}
