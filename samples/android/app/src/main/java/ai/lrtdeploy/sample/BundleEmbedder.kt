package ai.lrtdeploy.sample

import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer
import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtProvider
import ai.onnxruntime.OrtSession
import org.json.JSONObject
import java.nio.LongBuffer
import kotlin.math.sqrt

/** Raised when a bundle does not follow [BundleContract]; the message says what to do. */
class BundleException(message: String) : Exception(message)

/** Reads one file of the bundle (from assets, a download folder, ...). */
fun interface BundleFiles {
    fun bytes(name: String): ByteArray
}

/** What [checkManifest] decided: the files to open, the inputs to feed, the output to read. */
data class CheckedManifest(
    val modelFile: String,
    val tokenizerFile: String,
    val inputNames: List<String>,
    val output: OutputRule,
    /** Set when the model was exported with a fixed sequence axis (--fixed-shape). */
    val sequenceLength: Int?,
    /** Execution providers the bundle asks for, best first (manifest target.providers). */
    val providers: List<String>,
    /** ONNX Runtime session config entries the bundle needs (manifest devices.session_config). */
    val sessionConfig: Map<String, String> = emptyMap(),
    /** Device classes the bundle's int8 kernels are exact on (manifest devices.exact_on). */
    val exactOn: List<String> = emptyList(),
)

/** Token ids of a batch, padded on the right; row-major `[batch, length]`. */
class EncodedBatch(val inputIds: LongArray, val attentionMask: LongArray, val batch: Int, val length: Int)

/**
 * Embed texts with an lrt-deploy bundle on ONNX Runtime Android.
 *
 * The same steps, in the same order and with the same names, as samples/js/src/bundle.js:
 * readManifest -> checkManifest -> loadTokenizer -> createSession -> encode -> run -> pool.
 */
class BundleEmbedder private constructor(
    val manifest: JSONObject,
    val checked: CheckedManifest,
    private val tokenizer: HuggingFaceTokenizer,
    private val padId: Long,
    private val environment: OrtEnvironment,
    val session: OrtSession,
    /** Which provider the session was configured with ("XNNPACK", "NNAPI" or "CPU"). */
    val provider: String,
) : AutoCloseable {

    /** One vector per text. */
    fun embed(texts: List<String>): List<FloatArray> {
        val encoded = encode(texts)
        return pool(run(encoded), encoded)
    }

    /** Step 5: tokenize, then pad on the right to the longest text (or the fixed length). */
    fun encode(texts: List<String>): EncodedBatch {
        if (texts.isEmpty()) throw BundleException("no texts to embed; pass at least one string")
        val rows = tokenizer.batchEncode(texts).map { it.ids }
        val length = checked.sequenceLength ?: rows.maxOf { it.size }
        val inputIds = LongArray(texts.size * length) { padId }
        val attentionMask = LongArray(texts.size * length)
        rows.forEachIndexed { i, row ->
            row.take(length).forEachIndexed { j, id ->
                inputIds[i * length + j] = id
                attentionMask[i * length + j] = 1L
            }
        }
        return EncodedBatch(inputIds, attentionMask, texts.size, length)
    }

    /** Step 6: feed the inputs the model declares; return the contract's output, flattened. */
    fun run(encoded: EncodedBatch): Pair<FloatArray, LongArray> {
        val shape = longArrayOf(encoded.batch.toLong(), encoded.length.toLong())
        val arrays = mapOf(
            BundleContract.INPUT_IDS to encoded.inputIds,
            BundleContract.ATTENTION_MASK to encoded.attentionMask,
            BundleContract.TOKEN_TYPE_IDS to LongArray(encoded.inputIds.size),
        )
        val feeds = checked.inputNames.associateWith { name ->
            OnnxTensor.createTensor(environment, LongBuffer.wrap(arrays.getValue(name)), shape)
        }
        try {
            session.run(feeds, setOf(checked.output.name)).use { result ->
                val tensor = result.get(checked.output.name).get() as OnnxTensor
                val buffer = tensor.floatBuffer
                val values = FloatArray(buffer.remaining()).also { buffer.get(it) }
                return values to tensor.info.shape
            }
        } finally {
            feeds.values.forEach { it.close() }
        }
    }

    /** Step 7: one vector per text: pooled over the attention mask, L2-normalised if asked. */
    fun pool(output: Pair<FloatArray, LongArray>, encoded: EncodedBatch): List<FloatArray> {
        val (data, shape) = output
        val width = shape.last().toInt()
        val rule = checked.output
        return (0 until encoded.batch).map { b ->
            val vector = when (rule.pooling) {
                Pooling.NONE -> data.copyOfRange(b * width, (b + 1) * width)
                Pooling.MEAN -> {
                    val length = shape[1].toInt()
                    val sum = FloatArray(width)
                    var count = 0
                    for (t in 0 until length) {
                        if (encoded.attentionMask[b * length + t] == 0L) continue
                        count += 1
                        val offset = (b * length + t) * width
                        for (k in 0 until width) sum[k] += data[offset + k]
                    }
                    FloatArray(width) { sum[it] / maxOf(count, 1) }
                }
            }
            if (rule.normalize) {
                val norm = sqrt(vector.fold(0.0) { acc, v -> acc + v * v }).toFloat()
                if (norm > 0f) for (k in vector.indices) vector[k] /= norm
            }
            vector
        }
    }

    override fun close() {
        session.close()
        tokenizer.close()
    }

    companion object {
        /** Open a bundle: every step up to a ready session. */
        fun open(files: BundleFiles, threads: Int = 2): BundleEmbedder {
            val manifest = readManifest(files)
            val checked = checkManifest(manifest)
            val (tokenizer, padId) = loadTokenizer(files, checked.tokenizerFile)
            val environment = OrtEnvironment.getEnvironment()
            val (session, provider) = createSession(environment, files, checked, threads)
            return BundleEmbedder(manifest, checked, tokenizer, padId, environment, session, provider)
        }

        /** Step 1: parse manifest.json. */
        fun readManifest(files: BundleFiles): JSONObject =
            JSONObject(String(files.bytes(BundleContract.MANIFEST_FILE), Charsets.UTF_8))

        /** Step 2: check the manifest against [BundleContract]. */
        fun checkManifest(manifest: JSONObject): CheckedManifest {
            val version = manifest.optInt("format_version", -1)
            if (version != BundleContract.FORMAT_VERSION) {
                throw BundleException(
                    "manifest format_version $version is not ${BundleContract.FORMAT_VERSION}; " +
                        "use the lrt-deploy version that matches this app",
                )
            }
            val files = manifest.optJSONObject("files") ?: JSONObject()
            val modelFile = files.optString("model").ifEmpty { files.optString("onnx") }
            if (modelFile.isEmpty()) throw BundleException("manifest names no model under files.model; re-export the bundle")
            val tokenizerFile = files.optString("tokenizer")
            if (tokenizerFile.isEmpty()) {
                throw BundleException("manifest names no tokenizer under files.tokenizer; export a text model with its tokenizer")
            }
            val inputs = manifest.getJSONArray("inputs")
            val declared = (0 until inputs.length()).map { inputs.getJSONObject(it) }.associateBy { it.getString("name") }
            val known = listOf(BundleContract.INPUT_IDS, BundleContract.ATTENTION_MASK, BundleContract.TOKEN_TYPE_IDS)
            val unknown = declared.keys - known.toSet()
            if (unknown.isNotEmpty()) throw BundleException("the model takes inputs this app cannot fill: ${unknown.joinToString()}")
            for (name in known) {
                val spec = declared[name]
                if (spec == null) {
                    if (name != BundleContract.TOKEN_TYPE_IDS) {
                        throw BundleException("the model has no input '$name'; it is not a text encoder bundle")
                    }
                    continue
                }
                val rank = spec.getJSONArray("shape").length()
                if (spec.getString("dtype") != BundleContract.INPUT_DTYPE || rank != BundleContract.INPUT_RANK) {
                    throw BundleException(
                        "input '$name' is ${spec.getString("dtype")} of rank $rank, " +
                            "expected ${BundleContract.INPUT_DTYPE} of rank ${BundleContract.INPUT_RANK}",
                    )
                }
            }
            val outputs = manifest.getJSONArray("outputs")
            val outputNames = (0 until outputs.length()).map { outputs.getJSONObject(it).getString("name") }.toSet()
            val output = BundleContract.OUTPUTS.firstOrNull { it.name in outputNames }
                ?: throw BundleException(
                    "the model outputs ${outputNames.joinToString()}; expected one of " +
                        BundleContract.OUTPUTS.joinToString { it.name },
                )
            // A fixed sequence axis is a JSON number; a dynamic one is a name such as "sequence".
            val sequenceAxis = declared.getValue(BundleContract.INPUT_IDS).getJSONArray("shape").opt(1)
            val providers = manifest.optJSONObject("target")?.optJSONArray("providers")
            val devices = manifest.optJSONObject("devices")
            val config = devices?.optJSONObject("session_config")
            val exactOn = devices?.optJSONArray("exact_on")
            return CheckedManifest(
                modelFile = modelFile,
                tokenizerFile = tokenizerFile,
                inputNames = known.filter { it in declared },
                output = output,
                sequenceLength = (sequenceAxis as? Number)?.toInt()?.takeIf { it > 0 },
                providers = providers?.let { list -> (0 until list.length()).map { list.getString(it) } } ?: emptyList(),
                sessionConfig = config?.let { c -> c.keys().asSequence().associateWith { c.getString(it) } } ?: emptyMap(),
                exactOn = exactOn?.let { list -> (0 until list.length()).map { list.getString(it) } } ?: emptyList(),
            )
        }

        /** Step 3: the Hugging Face tokenizer from tokenizer.json, truncating like the Python runtime. */
        fun loadTokenizer(files: BundleFiles, tokenizerFile: String): Pair<HuggingFaceTokenizer, Long> {
            val json = files.bytes(tokenizerFile)
            val options = mapOf(
                "truncation" to "true",
                "maxLength" to BundleContract.MAX_LENGTH.toString(),
                "padding" to "false",
            )
            val tokenizer = HuggingFaceTokenizer.newInstance(json.inputStream(), options)
            val config = JSONObject(String(json, Charsets.UTF_8))
            val vocab = config.optJSONObject("model")?.optJSONObject("vocab")
            val padId = config.optJSONObject("padding")?.optLong("pad_id")
                ?: BundleContract.PAD_TOKEN_CANDIDATES.firstNotNullOfOrNull { token ->
                    vocab?.takeIf { it.has(token) }?.getLong(token)
                }
                ?: 0L
            return tokenizer to padId
        }

        /**
         * Step 4: the session, on the first provider of the manifest's list that this device's
         * ONNX Runtime has and the model suits (XNNPACK, or NNAPI for fixed shapes), else the CPU.
         */
        fun createSession(
            environment: OrtEnvironment,
            files: BundleFiles,
            checked: CheckedManifest,
            threads: Int,
        ): Pair<OrtSession, String> {
            val available = OrtEnvironment.getAvailableProviders()
            val options = OrtSession.SessionOptions()
            // Entries the bundle's int8 recipe relies on, if any (none for pair-safe weights).
            checked.sessionConfig.forEach { (key, value) -> options.addConfigEntry(key, value) }
            var provider = "CPU"
            for (name in checked.providers) {
                if (name == "XnnpackExecutionProvider" && OrtProvider.XNNPACK in available) {
                    // XNNPACK runs its own thread pool; ORT's intra-op pool would compete with it.
                    options.setIntraOpNumThreads(1)
                    options.addXnnpack(mapOf("intra_op_num_threads" to threads.toString()))
                    provider = "XNNPACK"
                    break
                }
                // NNAPI compiles fixed shapes only: with a dynamic batch/sequence it would leave
                // most of the graph to the CPU, so it is used only for --fixed-shape bundles.
                if (name == "NnapiExecutionProvider" && OrtProvider.NNAPI in available && checked.sequenceLength != null) {
                    options.addNnapi()
                    provider = "NNAPI"
                    break
                }
            }
            if (provider != "XNNPACK") options.setIntraOpNumThreads(threads)
            return environment.createSession(files.bytes(checked.modelFile), options) to provider
        }
    }
}
