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

    /** True when this process maps `path` (Linux /proc/self/maps); null where there is no /proc. */
    private static Boolean mapped(String path) throws IOException {
        Path maps = Paths.get("/proc/self/maps");
        if (!Files.isReadable(maps)) return null;
        String real = Paths.get(path).toRealPath().toString();
        for (String line : Files.readAllLines(maps, StandardCharsets.UTF_8)) {
            if (line.endsWith(" " + real)) return true;
        }
        return false;
    }

    /** The phone's path through JNI on the golden F32 bundle: openVision, encode, close, open, generate. */
    private static final class Pipeline {
        final Path dir;
        final String vision;
        final String gguf;
        final int imageSize;
        final int nEmbd;
        final float[] mean;
        final float[] std;
        final Map<String, int[]> rgbSizes;

        Pipeline(Path dir, String vision, String gguf, int imageSize, int nEmbd, float[] mean, float[] std,
                 Map<String, int[]> rgbSizes) {
            this.dir = dir;
            this.vision = vision;
            this.gguf = gguf;
            this.imageSize = imageSize;
            this.nEmbd = nEmbd;
            this.mean = mean;
            this.std = std;
            this.rgbSizes = rgbSizes;
        }

        /** Every golden image's rows from its file; the same rows from its RGB bytes and from its pixels. */
        Map<String, float[]> encodeAll(Map<String, String> imageFiles) throws IOException {
            final long handle = QwenVLNative.openVision(vision, 2);
            check(QwenVLNative.imageSize(handle) == imageSize, "vision imageSize == " + imageSize);
            check(QwenVLNative.embeddingSize(handle) == nEmbd, "vision embeddingSize == " + nEmbd);
            Map<String, float[]> rows = new HashMap<>();
            for (Map.Entry<String, String> e : imageFiles.entrySet()) {
                String name = e.getKey();
                float[] fromFile = QwenVLNative.encodeImageFile(handle, e.getValue(), mean, std);
                check(fromFile.length == 256 * nEmbd, name + ": " + fromFile.length + " floats from the file");
                double err = maxAbsDiff(fromFile, readFloats(dir.resolve(name + ".f32")));
                check(err <= 1e-4, name + ": rows from the file vs the golden rows, max abs error " + err);
                System.err.println("pipeline: " + name + " rows from the file vs golden, max abs error " + err);
                int[] size = rgbSizes.get(name);
                byte[] rgb = Files.readAllBytes(dir.resolve(name + ".rgb"));
                float[] fromBytes = QwenVLNative.encodeImage(handle, rgb, size[0], size[1], 3, mean, std);
                check(Arrays.equals(fromBytes, fromFile), name + ": encodeImage(RGB bytes) == encodeImageFile");
                float[] pixels = QwenVLNative.preprocess(rgb, size[0], size[1], 3, imageSize, mean, std);
                check(Arrays.equals(QwenVLNative.encodePixels(handle, pixels), fromFile),
                        name + ": encodePixels(preprocess) == encodeImageFile");
                rows.put(name, fromFile);
            }
            // freed before the decoder loads; a freed vision handle is refused
            QwenVLNative.close(handle);
            expectThrows(IllegalStateException.class, "encode after closing the vision model",
                    () -> QwenVLNative.encodePixels(handle, new float[3 * imageSize * imageSize]));
            return rows;
        }

        /** Golden-exact answers with the JNI rows (f16, read); q8_0 + mmap: the command's answers, the file mapped. */
        void answerGolden(Map<String, Case> cases, Map<String, float[]> rows, int maxNewTokens,
                          Map<String, String> q8Texts) throws IOException {
            for (String kv : new String[] {"f16", "q8_0"}) {
                boolean mmap = kv.equals("q8_0");
                long decoder = QwenVLNative.open(gguf, 1024, 2, kv, mmap);
                Boolean isMapped = mapped(gguf);
                check(isMapped == null || isMapped == mmap, kv + ": the GGUF is mapped iff useMmap (" + mmap + ")");
                for (String name : new String[] {"one_image", "two_images", "text_only"}) {
                    Case c = cases.get(name);
                    float[][] images = new float[c.images.size()][];
                    for (int i = 0; i < images.length; i++) images[i] = rows.get(c.images.get(i));
                    QwenVLNative.resetChat(decoder);
                    String reply = QwenVLNative.generate(decoder, images, c.text, maxNewTokens, 0.0f, 1.0f, null);
                    String want = mmap ? q8Texts.get(name) : c.generatedText;
                    check(reply.equals(want), "pipeline " + kv + " " + name + ": '" + reply + "' != '" + want + "'");
                    if (mmap) {
                        System.err.println("pipeline: q8_0 " + name + (reply.equals(c.generatedText)
                                ? ": the f16 answer" : ": another answer than f16's: '" + reply + "'"));
                    }
                }
                QwenVLNative.close(decoder);
            }
        }

        void badInput(Map<String, String> imageFiles) {
            final String anyImage = imageFiles.values().iterator().next();
            expectThrows(RuntimeException.class, "openVision a missing file",
                    () -> QwenVLNative.openVision("/nonexistent/vision.onnx", 1));
            expectThrows(RuntimeException.class, "openVision a GGUF", () -> QwenVLNative.openVision(gguf, 1));
            expectThrows(IllegalArgumentException.class, "openVision(null)", () -> QwenVLNative.openVision(null, 1));
            expectThrows(IllegalArgumentException.class, "open kvType q4",
                    () -> QwenVLNative.open(gguf, 0, 0, "q4", false));
            final long handle = QwenVLNative.openVision(vision, 1);
            final long decoder = QwenVLNative.open(gguf, 512, 1, "f16", false);
            try {
                expectThrows(IllegalArgumentException.class, "encodeImageFile a missing file",
                        () -> QwenVLNative.encodeImageFile(handle, "/nonexistent/photo.png", mean, std));
                expectThrows(IllegalArgumentException.class, "encodeImageFile a GGUF",
                        () -> QwenVLNative.encodeImageFile(handle, gguf, mean, std));
                expectThrows(IllegalArgumentException.class, "encodeImageFile no std",
                        () -> QwenVLNative.encodeImageFile(handle, anyImage, mean, null));
                expectThrows(IllegalArgumentException.class, "encodeImage short pixels",
                        () -> QwenVLNative.encodeImage(handle, new byte[5], 2, 2, 3, mean, std));
                expectThrows(IllegalArgumentException.class, "encodeImage channels 2",
                        () -> QwenVLNative.encodeImage(handle, new byte[8], 2, 2, 2, mean, std));
                expectThrows(IllegalArgumentException.class, "encodePixels wrong size",
                        () -> QwenVLNative.encodePixels(handle, new float[12]));
                expectThrows(IllegalArgumentException.class, "encodePixels null",
                        () -> QwenVLNative.encodePixels(handle, null));
                expectThrows(IllegalStateException.class, "generate on a vision handle",
                        () -> QwenVLNative.generate(handle, null, "Hi", 2, 0.0f, 1.0f, null));
                expectThrows(IllegalStateException.class, "encode on a decoder handle",
                        () -> QwenVLNative.encodeImageFile(decoder, anyImage, mean, std));
                expectThrows(IllegalStateException.class, "imageSize of a decoder handle",
                        () -> QwenVLNative.imageSize(decoder));
                try {
                    QwenVLNative.encodeImageFile(handle, "/nonexistent/photo.png", mean, std);
                } catch (IllegalArgumentException e) {
                    check(e.getMessage().contains("/nonexistent/photo.png"), "the error names the image: " + e.getMessage());
                }
            } finally {
                QwenVLNative.close(handle);
                QwenVLNative.close(decoder);
            }
        }
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
        Map<String, String> imageFiles = new HashMap<>();
        Map<String, String> q8Texts = new HashMap<>();
        String bundleVision = null;
        String bundleGguf = null;
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

        // pipeline.txt (tests/test_native_core.py): the F32 bundle, the golden image files, the q8_0 answers
        Path pipelineFile = dir.resolve("pipeline.txt");
        List<String> pipelineLines = Files.isReadable(pipelineFile)
                ? Files.readAllLines(pipelineFile, StandardCharsets.UTF_8) : new ArrayList<>();
        for (String line : pipelineLines) {
            String[] f = line.trim().split(" ", 3);
            switch (f[0]) {
                case "bundle_vision": bundleVision = f[1]; break;
                case "bundle_gguf": bundleGguf = f[1]; break;
                case "image_file": imageFiles.put(f[1], f[2]); break;
                case "q8_0_text": q8Texts.put(f[1], fromHex(f.length > 2 ? f[2] : "")); break;
                default: break;
            }
        }

        final long handle = QwenVLNative.open(gguf, 1024, 2, null, false);
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
        expectThrows(RuntimeException.class, "open a missing GGUF", () -> QwenVLNative.open("/nonexistent/llm.gguf", 0, 0, null, false));
        try {
            QwenVLNative.open("/nonexistent/llm.gguf", 0, 0, "f16", false);
        } catch (RuntimeException e) {
            check(e.getMessage().contains("/nonexistent/llm.gguf"), "open error names the path: " + e.getMessage());
        }
        expectThrows(IllegalArgumentException.class, "open(null)", () -> QwenVLNative.open(null, 0, 0, null, false));
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

        // the device pipeline: image -> vision -> (vision freed) -> decoder -> answer, all through JNI
        check(bundleVision != null && bundleGguf != null && !imageFiles.isEmpty() && !q8Texts.isEmpty(),
                "pipeline.txt names the F32 bundle, the image files and the q8_0 answers (tests/test_native_core.py)");
        if (bundleVision != null && bundleGguf != null) {
            Pipeline pipeline = new Pipeline(dir, bundleVision, bundleGguf, imageSize, nEmbd, mean, std, rgbSizes);
            Map<String, float[]> rows = pipeline.encodeAll(imageFiles);
            pipeline.answerGolden(cases, rows, maxNewTokens, q8Texts);
            pipeline.badInput(imageFiles);
        }

        System.err.println("NativeSmokeTest: " + checks + " checks, " + failures + " failed");
        System.exit(failures == 0 ? 0 : 1);
    }
}
