package ai.lrtdeploy.sample

import android.app.Activity
import android.os.Bundle
import android.os.SystemClock
import android.util.Log
import android.widget.ScrollView
import android.widget.TextView
import java.io.File
import kotlin.concurrent.thread

/**
 * Opens the bundle copied into assets/bundle, embeds a few sentences, and shows the figures the
 * README asks for: open time, first inference, median latency, peak memory, provider used.
 */
class MainActivity : Activity() {

    private val sentences = listOf(
        "A man is playing a guitar.",
        "Someone plays an instrument on stage!",
        "The stock market fell sharply today; investors were worried.",
    )

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val text = TextView(this).apply { setPadding(32, 32, 32, 32) }
        setContentView(ScrollView(this).apply { addView(text) })
        text.text = "Opening the bundle..."
        // Model loading and inference stay off the UI thread.
        thread(name = "embedder") {
            val report = try {
                measure()
            } catch (error: Exception) {
                Log.e(TAG, "embedding failed", error)
                "error: ${error.message}"
            }
            Log.i(TAG, report)
            runOnUiThread { text.text = report }
        }
    }

    private fun measure(): String {
        val files = BundleFiles { name -> assets.open("bundle/$name").use { it.readBytes() } }
        var start = SystemClock.elapsedRealtimeNanos()
        BundleEmbedder.open(files).use { embedder ->
            val openMs = (SystemClock.elapsedRealtimeNanos() - start) / 1e6
            start = SystemClock.elapsedRealtimeNanos()
            val vectors = embedder.embed(sentences)
            val firstMs = (SystemClock.elapsedRealtimeNanos() - start) / 1e6
            repeat(3) { embedder.embed(sentences) }
            val times = (1..20).map {
                start = SystemClock.elapsedRealtimeNanos()
                embedder.embed(sentences)
                (SystemClock.elapsedRealtimeNanos() - start) / 1e6
            }.sorted()
            val similarity = vectors[0].zip(vectors[1]).sumOf { (a, b) -> (a * b).toDouble() }
            return buildString {
                appendLine("provider: ${embedder.provider}")
                appendLine("output: ${embedder.checked.output.name} (${vectors[0].size} values)")
                appendLine("open: %.0f ms, first inference: %.1f ms".format(openMs, firstMs))
                appendLine("median: %.1f ms, p90: %.1f ms (%d sentences, 20 runs)".format(
                    times[times.size / 2], times[(times.size * 9) / 10], sentences.size))
                appendLine("peak memory (VmHWM): ${peakResidentKiB() / 1024} MiB")
                appendLine("cosine(sentence 1, sentence 2): %.4f".format(similarity))
            }
        }
    }

    /** The process's peak resident set as the kernel reports it. */
    private fun peakResidentKiB(): Long =
        File("/proc/self/status").readLines()
            .firstOrNull { it.startsWith("VmHWM:") }
            ?.split(Regex("\\s+"))?.get(1)?.toLong() ?: -1L

    private companion object {
        const val TAG = "LrtBundle"
    }
}
