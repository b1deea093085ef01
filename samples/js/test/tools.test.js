// The command-line tools beside the module: serve.js, wasm-bench.js and dump-tensors.js.

import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { copyFile, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";

import { EXPECTED, FIXTURE, JS_DIR, MANIFEST } from "./helpers.js";

const run = promisify(execFile);
const MODEL = path.join(FIXTURE, MANIFEST.files.model);
let scratch;
before(async () => {
  scratch = await mkdtemp(path.join(tmpdir(), "lrt-js-test-"));
});
after(async () => {
  await rm(scratch, { recursive: true, force: true });
});

/** The expected ids as wasm-bench/dump-tensors feeds: {name: {dims, data}}. */
function feeds() {
  const dims = [EXPECTED.input_ids.length, EXPECTED.input_ids[0].length];
  const zeros = EXPECTED.input_ids.flat().map(() => 0);
  return {
    input_ids: { dims, data: EXPECTED.input_ids.flat() },
    attention_mask: { dims, data: EXPECTED.attention_mask.flat() },
    token_type_ids: { dims, data: zeros },
  };
}

describe("serve.js", () => {
  let server;
  let base;
  before(async () => {
    server = spawn(process.execPath, ["serve.js", "--bundle", FIXTURE, "--port", "0"], { cwd: JS_DIR });
    base = await new Promise((resolve, reject) => {
      server.stdout.on("data", (chunk) => {
        const match = /serving (http:\/\/127\.0\.0\.1:\d+)\/web\//.exec(String(chunk));
        if (match) resolve(match[1]);
      });
      server.on("exit", (code) => reject(new Error(`serve.js exited with ${code}`)));
    });
  });
  after(() => server.kill());

  test("serves the bundle with the cross-origin isolation headers", async () => {
    const response = await fetch(`${base}/bundle/manifest.json`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("cross-origin-opener-policy"), "same-origin");
    assert.equal(response.headers.get("cross-origin-embedder-policy"), "require-corp");
    assert.deepEqual(await response.json(), MANIFEST);
  });

  test("serves the page's index.html for /web/", async () => {
    const response = await fetch(`${base}/web/`);
    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type"), /text\/html/);
  });

  test("refuses paths outside its two folders", async () => {
    const response = await fetch(`${base}/bundle/..%2F..%2Fpackage.json`);
    assert.equal(response.status, 404);
  });
});

describe("wasm-bench.js", () => {
  test("times graphs in WebAssembly and writes outputs equal to Python's", async () => {
    const feedsFile = path.join(scratch, "feeds.json");
    const batchesFile = path.join(scratch, "batches.json");
    await writeFile(feedsFile, JSON.stringify(feeds()));
    await writeFile(batchesFile, JSON.stringify([feeds()]));
    const out = path.join(scratch, "wasm-out");
    const copy = path.join(scratch, "copy.onnx");
    await copyFile(MODEL, copy);
    const { stdout } = await run(process.execPath, [
      "wasm-bench.js", "--models", `${MODEL},${copy}`, "--feeds", feedsFile, "--runs", "4",
      "--warmup", "1", "--blocks", "2", "--outputs", batchesFile, "--out", out,
    ], { cwd: JS_DIR });
    const result = JSON.parse(stdout);
    assert.equal(result[MODEL].ratio, 1, "the first graph is its own baseline");
    assert.ok(result[MODEL].median_ms > 0 && result[copy].median_ms > 0);
    assert.ok(result[copy].ratio_low <= result[copy].ratio && result[copy].ratio <= result[copy].ratio_high);
    const bytes = await readFile(path.join(out, "0-0.bin"));
    const vectors = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
    const width = EXPECTED.embeddings[0].length;
    EXPECTED.embeddings.forEach((row, i) => {
      row.forEach((value, k) => assert.ok(Math.abs(vectors[i * width + k] - value) < 1e-4));
    });
  });

  test("exits 2 with the usage line without --models", async () => {
    await assert.rejects(run(process.execPath, ["wasm-bench.js"], { cwd: JS_DIR }), (error) => {
      assert.equal(error.code, 2);
      assert.match(error.stderr, /usage: node wasm-bench\.js/);
      return true;
    });
  });
});

describe("dump-tensors.js", () => {
  for (const runtime of ["node", "web"]) {
    test(`writes every output and index.json on onnxruntime-${runtime}`, async () => {
      const feedsFile = path.join(scratch, `feeds-${runtime}.json`);
      await writeFile(feedsFile, JSON.stringify(feeds()));
      const out = path.join(scratch, `dump-${runtime}`);
      await run(process.execPath, [
        "dump-tensors.js", "--model", MODEL, "--feeds", feedsFile, "--out", out, "--runtime", runtime,
      ], { cwd: JS_DIR });
      const index = JSON.parse(await readFile(path.join(out, "index.json"), "utf8"));
      const entry = index[EXPECTED.output];
      assert.deepEqual(entry.dims, [EXPECTED.embeddings.length, EXPECTED.embeddings[0].length]);
      assert.equal(entry.type, "float32");
      const bytes = await readFile(path.join(out, entry.file));
      assert.equal(bytes.byteLength, 4 * EXPECTED.embeddings.flat().length);
    });
  }
});
