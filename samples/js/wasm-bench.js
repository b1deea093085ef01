#!/usr/bin/env node
// Time several ONNX graphs on onnxruntime-web's WebAssembly backend in Node (the .wasm the page
// loads), interleaved so load from other processes hits them alike, and optionally write each
// graph's first output on a list of batches (for fidelity). benchmarks/bench_backends.py drives
// it to compare LRT and dense int8 on a runtime without x86's int8 matrix units.
//
//   node wasm-bench.js --models base.onnx,b.onnx --feeds feeds.json [--runs 30] [--threads 1]
//                      [--blocks 5] [--outputs batches.json --out DIR]
//   (--runs 0 with --outputs: outputs only, no --feeds needed)
//
// feeds.json: {name: {dims, data[, type: "float32"]}} (int64 unless typed), the timed input.
// batches.json: a list of such objects; DIR/<graph index>-<batch index>.bin gets the first
// output as raw float32 bytes.
// Prints one JSON object: per graph, the median ms and the median ratio to the first graph over
// paired runs, with that ratio's range over --blocks blocks of runs.

import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    models: { type: "string" },
    feeds: { type: "string" },
    runs: { type: "string", default: "30" },
    warmup: { type: "string", default: "3" },
    threads: { type: "string", default: "1" },
    blocks: { type: "string", default: "5" },
    outputs: { type: "string" },
    out: { type: "string" },
  },
});
const runs = Number(values.runs);
if (!values.models || (!values.feeds && runs > 0) || (values.outputs && !values.out)) {
  console.error("usage: node wasm-bench.js --models A.onnx,B.onnx --feeds FEEDS.json " +
    "[--runs N] [--threads T] [--outputs BATCHES.json --out DIR]");
  process.exit(2);
}
const ort = await import("onnxruntime-web");
ort.env.wasm.numThreads = Number(values.threads);

function tensors(spec) {
  const feeds = {};
  for (const [name, { dims, data, type }] of Object.entries(spec)) {
    feeds[name] = type === "float32"
      ? new ort.Tensor("float32", Float32Array.from(data), dims)
      : new ort.Tensor("int64", BigInt64Array.from(data, BigInt), dims);
  }
  return feeds;
}
function only(session, feeds) {
  return Object.fromEntries(session.inputNames.map((n) => [n, feeds[n]]));
}

const files = values.models.split(",");
const sessions = [];
for (const file of files) {
  sessions.push(await ort.InferenceSession.create(new Uint8Array(await readFile(file)), {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
  }));
}
if (values.outputs) {
  await mkdir(values.out, { recursive: true });
  const batches = JSON.parse(await readFile(values.outputs, "utf8")).map(tensors);
  for (const [g, session] of sessions.entries()) {
    for (const [b, batch] of batches.entries()) {
      const result = await session.run(only(session, batch));
      const { buffer, byteOffset, byteLength } = result[session.outputNames[0]].data;
      await writeFile(path.join(values.out, `${g}-${b}.bin`), Buffer.from(buffer, byteOffset, byteLength));
    }
  }
}

if (runs === 0) { // outputs only
  console.log("{}");
  process.exit(0);
}
const timed = tensors(JSON.parse(await readFile(values.feeds, "utf8")));
const feeds = sessions.map((s) => only(s, timed));
for (const [g, session] of sessions.entries()) {
  for (let i = 0; i < Number(values.warmup); i++) await session.run(feeds[g]);
}
const times = sessions.map(() => []);
for (let run = 0; run < runs; run++) {
  for (let k = 0; k < sessions.length; k++) {
    const g = run % 2 ? sessions.length - 1 - k : k; // alternate the order
    const start = performance.now();
    await sessions[g].run(feeds[g]);
    times[g].push(performance.now() - start);
  }
}
const median = (a) => {
  const s = [...a].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const blocks = Math.max(1, Math.min(Number(values.blocks), times[0].length));
const result = {};
for (const [g, file] of files.entries()) {
  const ratios = times[g].map((t, i) => t / times[0][i]);
  const size = Math.ceil(ratios.length / blocks);
  const perBlock = [];
  for (let i = 0; i < ratios.length; i += size) perBlock.push(median(ratios.slice(i, i + size)));
  result[file] = {
    median_ms: median(times[g]), ratio: median(ratios),
    ratio_low: Math.min(...perBlock), ratio_high: Math.max(...perBlock),
  };
}
console.log(JSON.stringify(result));
