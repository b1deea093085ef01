package ai.lrtdeploy.sample

/**
 * What this app reads from an lrt-deploy bundle: the same values as
 * samples/bundle-contract.json and samples/js/src/bundle.js (tests/test_js_runtimes.py checks
 * that the three agree and that a freshly exported bundle follows them).
 */
object BundleContract {
    const val CONTRACT_VERSION = 1
    const val MANIFEST_FILE = "manifest.json"
    const val FORMAT_VERSION = 1

    const val INPUT_IDS = "input_ids"
    const val ATTENTION_MASK = "attention_mask"
    const val TOKEN_TYPE_IDS = "token_type_ids"
    const val INPUT_DTYPE = "int64"
    const val INPUT_RANK = 2

    /** Texts longer than this are truncated (special tokens included), as in the Python runtime. */
    const val MAX_LENGTH = 128
    val PAD_TOKEN_CANDIDATES = listOf("[PAD]", "<pad>")

    /** The first of these outputs the model has is the embedding; how to turn it into one vector. */
    val OUTPUTS = listOf(
        OutputRule(name = "sentence_embedding", rank = 2, pooling = Pooling.NONE, normalize = false),
        OutputRule(name = "last_hidden_state", rank = 3, pooling = Pooling.MEAN, normalize = true),
    )
}

enum class Pooling { NONE, MEAN }

data class OutputRule(val name: String, val rank: Int, val pooling: Pooling, val normalize: Boolean)
