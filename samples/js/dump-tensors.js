#!/usr/bin/env node
// Run an ONNX model on onnxruntime-web's WebAssembly backend (in Node, the same .wasm the page
// loads) or on onnxruntime-node, and write every output as raw bytes plus index.json.
// compare_layers.py feeds it a copy of a bundle's graph whose intermediate tensors are all
// graph outputs, to find where two builds part.
//
//   node dump-tensors.js --model all.onnx --feeds feeds.json --out DIR [--runtime web|node]

import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    feeds: { type: "string" },
    out: { type: "string" },
    runtime: { type: "string", default: "web" },
    threads: { type: "string", default: "1" },
  },
});
if (!values.model || !values.feeds || !values.out) {
  console.error("usage: node dump-tensors.js --model M.onnx --feeds FEEDS.json --out DIR [--runtime web|node]");
  process.exit(2);
}
const web = values.runtime === "web";
const ort = web ? await import("onnxruntime-web") : await import("onnxruntime-node");
if (web) ort.env.wasm.numThreads = Number(values.threads);

// feeds.json: {name: {dims: [...], data: [...]}}, int64 (token ids and masks).
const feeds = {};
for (const [name, { dims, data }] of Object.entries(JSON.parse(await readFile(values.feeds, "utf8")))) {
  feeds[name] = new ort.Tensor("int64", BigInt64Array.from(data, BigInt), dims);
}
// No optimisation at load: both runtimes must run the nodes of the file as they are.
const session = await ort.InferenceSession.create(new Uint8Array(await readFile(values.model)), {
  executionProviders: [web ? "wasm" : "cpu"],
  graphOptimizationLevel: "disabled",
  intraOpNumThreads: Number(values.threads),
});
const outputs = await session.run(feeds);
await mkdir(values.out, { recursive: true });
const index = {};
for (const [i, [name, tensor]] of Object.entries(outputs).entries()) {
  const file = `${i}.bin`;
  const { buffer, byteOffset, byteLength } = tensor.data;
  await writeFile(path.join(values.out, file), Buffer.from(buffer, byteOffset, byteLength));
  index[name] = { file, dims: tensor.dims, type: tensor.type };
}
await writeFile(path.join(values.out, "index.json"), JSON.stringify(index));
console.log(`${Object.keys(index).length} tensors written to ${values.out}`);
