package ai.qwenvledge;

/**
 * Qwen-VL-Chat on the device: the JNI face of libqwenvl_core, the same native pipeline as the
 * {@code qwenvl-native} command (native/include/qwenvl_vision.h, qwenvl_preprocess.h, qwenvl_core.h).
 *
 * <p>The steps, in the order a phone runs them:
 * <ol>
 *   <li>{@link #openVision} loads the bundle's vision.onnx (ONNX Runtime's C API, the libonnxruntime.so
 *       the native build links); {@link #encodeImage} (decoded pixels) or {@link #encodeImageFile}
 *       (a file) gives one image's rows: the Pillow-exact resize, the bundle's mean/std and the vision
 *       graph in one native call; {@link #encodePixels} takes pixels already made by {@link #preprocess};
 *   <li>{@link #close} frees the vision model before the decoder loads (on a phone the two then never
 *       share memory);
 *   <li>{@link #open} loads llm.gguf (llama.cpp) with the KV cache type and the map/read choice;
 *       {@link #generate} answers with the rows (256 rows of {@link #embeddingSize} floats per image).
 * </ol>
 *
 * <p>A handle is one decoder (model + llama.cpp context + chat) or one vision model; use it from one
 * thread at a time and free it with {@link #close}. The KV cache is kept across {@link #generate}
 * calls, so a follow-up question decodes only its own tokens; {@link #resetChat} starts over.
 *
 * <p>Errors: a bad argument throws IllegalArgumentException, a closed or unknown handle (or one of
 * the other kind) IllegalStateException, any other failure RuntimeException; each with a one-line
 * message.
 */
public final class QwenVLNative {
    static {
        System.loadLibrary("qwenvl_jni");
    }

    private QwenVLNative() {}

    /** Receives the reply as it is generated. */
    public interface TokenCallback {
        /**
         * One generated piece of text (whole UTF-8 characters; may be empty while a character is split over tokens).
         *
         * @return true to go on, false to stop generating
         */
        boolean onToken(String piece);
    }

    /**
     * Load a Qwen-VL decoder GGUF.
     *
     * @param ggufPath the bundle's llm.gguf
     * @param nCtx context positions (tokens + 256 per image); 0 for the default 2048
     * @param nThreads CPU threads; 0 for all cores
     * @param kvType the KV cache type: "f16" (or null: the default, exactly as the Python runtime) or "q8_0"
     *     (half the KV memory, the phone setting; turns flash attention on, answers may differ slightly)
     * @param useMmap false (default): read the weights into memory, where llama.cpp repacks them for the CPU's
     *     fastest kernels; true: map the GGUF and use it as it is (no repacking), the weights then stay file
     *     pages the OS can drop under memory pressure
     * @return a decoder handle for the other methods
     * @throws RuntimeException with the native message when the file is missing or not loadable
     */
    public static native long open(String ggufPath, int nCtx, int nThreads, String kvType, boolean useMmap);

    /** Free a decoder or vision handle (0 or an already closed handle is ignored). */
    public static native void close(long handle);

    /**
     * Load the bundle's vision model (vision encoder + adapter, FP32 or INT8) on the CPU through ONNX Runtime's
     * C API; its signature is checked here, so a wrong file fails before any photo.
     *
     * @param onnxPath the bundle's vision.onnx (its vision.onnx.data, if any, beside it)
     * @param nThreads CPU threads; 0 for ONNX Runtime's default (one per physical core)
     * @return a vision handle: {@link #imageSize}, {@link #embeddingSize}, the encode methods, {@link #close}
     * @throws RuntimeException with the native message when the file is missing, not a vision graph, or the
     *     core was built without ONNX Runtime
     */
    public static native long openVision(String onnxPath, int nThreads);

    /** The vision model's input side S (manifest model.image_size). */
    public static native int imageSize(long visionHandle);

    /**
     * One image's rows from its pixels, as the Python runtime does it: transparency onto white, Pillow bicubic
     * resize to {@link #imageSize}, the bundle's mean/std, the vision graph.
     *
     * @param pixels row-major HWC bytes, {@code channels} 3 (RGB) or 4 (RGBA, not premultiplied)
     * @param mean the model's per-channel mean (manifest model.image_mean, 3 floats)
     * @param std the model's per-channel std (manifest model.image_std, 3 floats)
     * @return float32 [256 * embeddingSize] rows for {@link #generate}
     */
    public static native float[] encodeImage(long visionHandle, byte[] pixels, int width, int height, int channels,
                                             float[] mean, float[] std);

    /**
     * One image file's rows: decoded by the native reader of {@code qwenvl-native} (EXIF orientation applied,
     * transparency onto white; PNG and JPEG where the build found libpng/libjpeg, PPM/PGM always), then as
     * {@link #encodeImage}.
     */
    public static native float[] encodeImageFile(long visionHandle, String imagePath, float[] mean, float[] std);

    /** Pixels already made by {@link #preprocess} (float32 [3, S, S]) -> the image's rows. */
    public static native float[] encodePixels(long visionHandle, float[] pixels);

    /**
     * Image pixels to the vision encoder's input, exactly as the Python runtime does (transparency onto white, Pillow
     * bicubic resize, the bundle's mean/std).
     *
     * @param pixels row-major HWC bytes, {@code channels} 3 (RGB) or 4 (RGBA, not premultiplied: composited onto
     *     white, as the Python runtime and a browser show a transparent image)
     * @param imageSize the model's input side (manifest model.image_size)
     * @param mean the model's per-channel mean (manifest model.image_mean, 3 floats)
     * @param std the model's per-channel std (manifest model.image_std, 3 floats)
     * @return float32 [3, imageSize, imageSize], channel-major
     */
    public static native float[] preprocess(byte[] pixels, int width, int height, int channels, int imageSize,
                                            float[] mean, float[] std);

    /**
     * Ask a question about zero or more images and generate the reply.
     *
     * @param imageRows one array of 256 * embeddingSize floats per image (may be null for none)
     * @param maxTokens most tokens to generate
     * @param temperature 0 for greedy decoding
     * @param topP nucleus mass in [0, 1]; 1 turns it off
     * @param callback streamed pieces, or null
     * @return the reply text
     */
    public static native String generate(long handle, float[][] imageRows, String question, int maxTokens,
                                         float temperature, float topP, TokenCallback callback);

    /** Forget the chat (KV cache and turns). */
    public static native void resetChat(long handle);

    /**
     * Width of one image row: the decoder's embedding size (decoder handle), or the width of the rows the vision
     * model writes (vision handle); the two must be equal.
     */
    public static native int embeddingSize(long handle);
}
