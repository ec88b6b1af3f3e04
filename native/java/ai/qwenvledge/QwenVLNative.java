package ai.qwenvledge;

/**
 * Qwen-VL-Chat's decoder side on the device: the JNI face of libqwenvl_core (native/include/qwenvl_core.h).
 *
 * <p>A handle is one model + llama.cpp context + chat; use it from one thread at a time and free it
 * with {@link #close}. The KV cache is kept across {@link #generate} calls, so a follow-up question
 * decodes only its own tokens; {@link #resetChat} starts over. Image rows come from the vision
 * encoder (onnxruntime on the app side): 256 rows of {@link #embeddingSize} floats per image, fed
 * with the pixels {@link #preprocess} makes.
 *
 * <p>Errors: a bad argument throws IllegalArgumentException, a closed or unknown handle
 * IllegalStateException, any other failure RuntimeException; each with a one-line message.
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
     * @return a handle for the other methods
     * @throws RuntimeException with the native message when the file is missing or not loadable
     */
    public static native long open(String ggufPath, int nCtx, int nThreads);

    /** Free a handle (0 or an already closed handle is ignored). */
    public static native void close(long handle);

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

    /** Width of one image row: the decoder's embedding size. */
    public static native int embeddingSize(long handle);
}
