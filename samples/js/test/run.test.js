// Running the bundle on onnxruntime-node: Python's embeddings, pooling, timing, the CLI.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import { describe, test } from "node:test";

import * as ort from "onnxruntime-node";

import { benchmark, openBundle, pool, summarize } from "../src/bundle.js";
import { EXPECTED, FIXTURE, JS_DIR, folderLoader, maxAbsDiff } from "./helpers.js";

const run = promisify(execFile);
const CPU = { executionProviders: ["cpu"], intraOpNumThreads: 1 };

describe("openBundle", () => {
  test("embeds like Python's runtime", async () => {
    const bundle = await openBundle({ ort, load: folderLoader(FIXTURE), sessionOptions: CPU });
    assert.equal(bundle.checked.output.name, EXPECTED.output);
    const vectors = await bundle.embed(EXPECTED.sentences);
    assert.equal(vectors.length, EXPECTED.embeddings.length);
    vectors.forEach((vector, i) => {
      assert.equal(vector.length, EXPECTED.embeddings[i].length);
      assert.ok(maxAbsDiff(vector, EXPECTED.embeddings[i]) < 1e-5, `sentence ${i}`);
    });
    assert.ok(bundle.openMs >= 0);
  });

  test("gives a sentence the same vector alone as in a padded batch", async () => {
    const bundle = await openBundle({ ort, load: folderLoader(FIXTURE), sessionOptions: CPU });
    const [alone] = await bundle.embed([EXPECTED.sentences[2]]);
    assert.ok(maxAbsDiff(alone, EXPECTED.embeddings[2]) < 1e-5);
  });
});

describe("pool", () => {
  const tensor = (data, dims) => ({ data: Float32Array.from(data), dims });

  test("returns sentence_embedding rows as they are", () => {
    const vectors = pool(tensor([1, 2, 3, 4], [2, 2]), { pooling: "none", normalize: false }, null);
    assert.deepEqual(vectors.map((v) => Array.from(v)), [[1, 2], [3, 4]]);
  });

  test("averages last_hidden_state over the mask, then L2-normalises", () => {
    // batch 1, 3 tokens, width 2; the third token is padding.
    const output = tensor([3, 0, 1, 4, 100, 100], [1, 3, 2]);
    const [vector] = pool(output, { pooling: "mean", normalize: true }, BigInt64Array.from([1n, 1n, 0n]));
    assert.ok(Math.abs(vector[0] - 2 / Math.hypot(2, 2)) < 1e-6);
    assert.ok(Math.abs(vector[1] - 2 / Math.hypot(2, 2)) < 1e-6);
  });
});

describe("summarize and benchmark", () => {
  test("summarize gives median, p90, min and max", () => {
    const stats = summarize([5, 1, 4, 2, 3, 10, 6, 7, 8, 9]);
    assert.deepEqual(stats, { runs: 10, medianMs: 6, p90Ms: 10, minMs: 1, maxMs: 10 });
  });

  test("benchmark returns the first batch's embeddings and the timed runs", async () => {
    const result = await benchmark({
      ort, load: folderLoader(FIXTURE), sessionOptions: CPU, texts: EXPECTED.sentences, warmup: 1, runs: 3,
    });
    assert.equal(result.latency.runs, 3);
    assert.equal(result.output, "sentence_embedding");
    assert.ok(maxAbsDiff(result.embeddings[0], EXPECTED.embeddings[0]) < 1e-5);
  });
});

describe("node src/node.js", () => {
  test("prints the embeddings, timings and memory as JSON", async () => {
    const { stdout } = await run(process.execPath, [
      "src/node.js", "--bundle", FIXTURE, "--threads", "1", "--runs", "2", "--warmup", "0",
      ...EXPECTED.sentences,
    ], { cwd: JS_DIR });
    const report = JSON.parse(stdout);
    assert.equal(report.runtime, "onnxruntime-node");
    assert.equal(report.latency.runs, 2);
    assert.ok(report.memory.peakRssBytes > 0);
    assert.ok(maxAbsDiff(report.embeddings[1], EXPECTED.embeddings[1]) < 1e-5);
  });

  test("exits 2 with the usage line without --bundle", async () => {
    await assert.rejects(run(process.execPath, [path.join(JS_DIR, "src", "node.js")]), (error) => {
      assert.equal(error.code, 2);
      assert.match(error.stderr, /usage: node src\/node\.js --bundle DIR/);
      return true;
    });
  });
});
