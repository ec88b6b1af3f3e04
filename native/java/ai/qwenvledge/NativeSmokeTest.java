package ai.qwenvledge;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * Drives {@link QwenVLNative} through libqwenvl_jni as the Android app does, on the tiny golden model.
 *
 * <p>Reads the folder named by QWENVL_TEST_DATA (written by tests/test_native_core.py, see
 * native/tests/test_data.h); exits 77 (skipped) without it, 1 when a check fails, 0 otherwise.
 */
public final class NativeSmokeTest {
    private static int checks = 0;
    private static int failures = 0;

    private static void check(boolean ok, String what) {
        checks++;
        if (!ok) {
            failures++;
            System.err.println("FAILED: " + what);
        }
    }

    /** Runs `body` and checks that it throws `expected` with a non-empty message. */
    private static void expectThrows(Class<? extends Throwable> expected, String what, Runnable body) {
        try {
            body.run();
            check(false, what + ": no exception, expected " + expected.getSimpleName());
        } catch (Throwable t) {
            boolean ok = expected.isInstance(t) && t.getMessage() != null && !t.getMessage().isEmpty();
            check(ok, what + ": threw " + t + ", expected " + expected.getSimpleName());
        }
    }

    /** One golden case of cases.txt. */
    private static final class Case {
        String name;
        List<String> images = new ArrayList<>();
        String text;
        String generatedText;
        boolean checkGeneration;
    }

    private static String fromHex(String hex) {
        byte[] bytes = new byte[hex.length() / 2];
        for (int i = 0; i < bytes.length; i++) {
            bytes[i] = (byte) Integer.parseInt(hex.substring(2 * i, 2 * i + 2), 16);
        }
        return new String(bytes, StandardCharsets.UTF_8);
    }

    static float[] parseFloats(String text) {
        String[] parts = text.trim().split(" ");
        float[] out = new float[parts.length];
        for (int i = 0; i < parts.length; i++) out[i] = Float.parseFloat(parts[i]);
        return out;
    }

    private static double maxAbsDiff(float[] a, float[] b) {
        if (a.length != b.length) return Double.POSITIVE_INFINITY;
        double max = 0;
        for (int i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
        return max;
    }

    private static float[] readFloats(Path file) throws IOException {
        ByteBuffer buf = ByteBuffer.wrap(Files.readAllBytes(file)).order(ByteOrder.LITTLE_ENDIAN);
        float[] out = new float[buf.remaining() / 4];
        buf.asFloatBuffer().get(out);
        return out;
    }

    public static void main(String[] args) throws IOException {
        String dirName = System.getenv("QWENVL_TEST_DATA");
        if (dirName == null || dirName.isEmpty()) {
            System.err.println("skipped: QWENVL_TEST_DATA is not set (tests/test_native_core.py writes it)");
            System.exit(77);
        }
        Path dir = Paths.get(dirName);
        String gguf = null;
        int nEmbd = 0;
        int imageSize = 0;
        float[] mean = null;
        float[] std = null;
        float[] otherMean = null;
        float[] otherStd = null;
        int maxNewTokens = 24;
        Map<String, int[]> rgbSizes = new HashMap<>();
        Map<String, int[]> rgbaSizes = new HashMap<>();
        Map<String, Case> cases = new HashMap<>();
        Case current = null;
        for (String line : Files.readAllLines(dir.resolve("cases.txt"), StandardCharsets.UTF_8)) {
            String[] f = line.trim().split(" ", 2);
            String value = f.length > 1 ? f[1] : "";
            switch (f[0]) {
                case "gguf": gguf = value; break;
                case "n_embd": nEmbd = Integer.parseInt(value); break;
                case "image_size": imageSize = Integer.parseInt(value); break;
                case "image_mean": mean = parseFloats(value); break;
                case "image_std": std = parseFloats(value); break;
                case "other_image_mean": otherMean = parseFloats(value); break;
                case "other_image_std": otherStd = parseFloats(value); break;
                case "rgba": {
                    String[] p = value.split(" ");
                    rgbaSizes.put(p[0], new int[] {Integer.parseInt(p[1]), Integer.parseInt(p[2])});
                    break;
                }
                case "max_new_tokens": maxNewTokens = Integer.parseInt(value); break;
                case "rgb": {
                    String[] p = value.split(" ");
                    rgbSizes.put(p[0], new int[] {Integer.parseInt(p[1]), Integer.parseInt(p[2])});
                    break;
                }
                case "case": current = new Case(); current.name = value; cases.put(value, current); break;
                case "images": if (!value.isEmpty()) current.images.addAll(Arrays.asList(value.split(" "))); break;
                case "text": current.text = fromHex(value); break;
                case "generated_text": current.generatedText = fromHex(value); break;
                case "check_generation": current.checkGeneration = value.equals("1"); break;
                default: break;
            }
        }

        final long handle = QwenVLNative.open(gguf, 1024, 2);
        check(handle != 0, "open returned a handle");
        check(QwenVLNative.embeddingSize(handle) == nEmbd, "embeddingSize == " + nEmbd);

        // golden greedy generation, streamed: the pieces add up to the reply
        for (String name : new String[] {"one_image", "text_only"}) {
            Case c = cases.get(name);
            float[][] rows = new float[c.images.size()][];
            for (int i = 0; i < rows.length; i++) rows[i] = readFloats(dir.resolve(c.images.get(i) + ".f32"));
            StringBuilder streamed = new StringBuilder();
            QwenVLNative.resetChat(handle);
            String reply = QwenVLNative.generate(handle, rows, c.text, maxNewTokens, 0.0f, 1.0f, piece -> {
                streamed.append(piece);
                return true;
            });
            check(reply.equals(c.generatedText), name + ": reply '" + reply + "' != golden '" + c.generatedText + "'");
            check(streamed.toString().equals(reply), name + ": streamed pieces != reply");
        }

        // a follow-up question reuses the chat; a callback returning false stops after its first piece
        List<String> pieces = new ArrayList<>();
        String stopped = QwenVLNative.generate(handle, null, "图片里有什么？ Tell me more.", 16, 0.8f, 0.3f, piece -> {
            pieces.add(piece);
            return false;
        });
        check(pieces.size() == 1 && stopped.equals(pieces.get(0)), "callback false stops after one piece");

        // an exception thrown by the callback reaches the caller; the handle stays usable
        RuntimeException boom = new RuntimeException("boom");
        try {
            QwenVLNative.generate(handle, null, "Hi", 4, 0.0f, 1.0f, piece -> { throw boom; });
            check(false, "callback exception propagates");
        } catch (RuntimeException e) {
            check(e == boom, "callback exception propagates unchanged");
        }
        check(QwenVLNative.generate(handle, null, "Hi", 2, 0.0f, 1.0f, null) != null, "generate without callback");

        // bad input: exceptions with messages, never a crash
        expectThrows(RuntimeException.class, "open a missing GGUF", () -> QwenVLNative.open("/nonexistent/llm.gguf", 0, 0));
        try {
            QwenVLNative.open("/nonexistent/llm.gguf", 0, 0);
        } catch (RuntimeException e) {
            check(e.getMessage().contains("/nonexistent/llm.gguf"), "open error names the path: " + e.getMessage());
        }
        expectThrows(IllegalArgumentException.class, "open(null)", () -> QwenVLNative.open(null, 0, 0));
        expectThrows(IllegalArgumentException.class, "rows of the wrong size",
                () -> QwenVLNative.generate(handle, new float[][] {new float[100]}, "Hi", 4, 0.0f, 1.0f, null));
        expectThrows(IllegalArgumentException.class, "a null image",
                () -> QwenVLNative.generate(handle, new float[][] {null}, "Hi", 4, 0.0f, 1.0f, null));
        expectThrows(IllegalArgumentException.class, "null question",
                () -> QwenVLNative.generate(handle, null, null, 4, 0.0f, 1.0f, null));
        expectThrows(IllegalArgumentException.class, "maxTokens 0",
                () -> QwenVLNative.generate(handle, null, "Hi", 0, 0.0f, 1.0f, null));
        expectThrows(IllegalArgumentException.class, "topP 2",
                () -> QwenVLNative.generate(handle, null, "Hi", 4, 0.5f, 2.0f, null));
        final int side = imageSize;
        final float[] normMean = mean;
        final float[] normStd = std;
        expectThrows(IllegalArgumentException.class, "preprocess channels 2",
                () -> QwenVLNative.preprocess(new byte[8], 2, 2, 2, side, normMean, normStd));
        expectThrows(IllegalArgumentException.class, "preprocess short pixels",
                () -> QwenVLNative.preprocess(new byte[5], 2, 2, 3, side, normMean, normStd));
        expectThrows(IllegalArgumentException.class, "preprocess null",
                () -> QwenVLNative.preprocess(null, 2, 2, 3, side, normMean, normStd));
        expectThrows(IllegalArgumentException.class, "preprocess no mean",
                () -> QwenVLNative.preprocess(new byte[12], 2, 2, 3, side, null, null));

        // preprocessing equals the golden pixels
        for (Map.Entry<String, int[]> e : rgbSizes.entrySet()) {
            byte[] rgb = Files.readAllBytes(dir.resolve(e.getKey() + ".rgb"));
            float[] pixels = QwenVLNative.preprocess(rgb, e.getValue()[0], e.getValue()[1], 3, imageSize, mean, std);
            float[] golden = readFloats(dir.resolve(e.getKey() + ".pixels.f32"));
            double maxErr = pixels.length == golden.length ? 0 : Double.POSITIVE_INFINITY;
            for (int i = 0; i < Math.min(pixels.length, golden.length); i++) {
                maxErr = Math.max(maxErr, Math.abs(pixels[i] - golden[i]));
            }
            check(maxErr <= 1e-6, "preprocess " + e.getKey() + " max abs error " + maxErr);
            // another model's mean/std (the bundle's, as the app reads them from the manifest): other pixels,
            // the Python runtime's for that bundle
            float[] other = QwenVLNative.preprocess(rgb, e.getValue()[0], e.getValue()[1], 3, imageSize, otherMean,
                    otherStd);
            check(maxAbsDiff(other, readFloats(dir.resolve(e.getKey() + ".other.pixels.f32"))) <= 1e-6,
                    "preprocess " + e.getKey() + " with the other mean/std equals Python's");
            check(maxAbsDiff(other, golden) > 1e-3, "preprocess " + e.getKey() + ": other mean/std, other pixels");
        }
        check(otherMean != null && !rgbaSizes.isEmpty(), "cases.txt has the other mean/std and an RGBA picture");

        // RGBA: transparency composited onto white, exactly as the Python runtime does
        for (Map.Entry<String, int[]> e : rgbaSizes.entrySet()) {
            byte[] rgba = Files.readAllBytes(dir.resolve(e.getKey() + ".rgba"));
            float[] pixels = QwenVLNative.preprocess(rgba, e.getValue()[0], e.getValue()[1], 4, imageSize, mean, std);
            double err = maxAbsDiff(pixels, readFloats(dir.resolve(e.getKey() + ".rgba.pixels.f32")));
            check(err <= 1e-6, "preprocess RGBA " + e.getKey() + " (on white) max abs error " + err);
        }

        // a closed handle is refused, closing twice is harmless
        QwenVLNative.close(handle);
        QwenVLNative.close(handle);
        expectThrows(IllegalStateException.class, "use after close", () -> QwenVLNative.embeddingSize(handle));
        expectThrows(IllegalStateException.class, "made-up handle", () -> QwenVLNative.resetChat(123456789L));

        System.err.println("NativeSmokeTest: " + checks + " checks, " + failures + " failed");
        System.exit(failures == 0 ? 0 : 1);
    }
}
