#!/usr/bin/env node
// Embed sentences with an lrt-deploy bundle in Node (or Electron's main process) on
// onnxruntime-node, and print the embeddings, timings and memory as JSON.
//
//   node src/node.js --bundle out/all-MiniLM-L6-v2-mobile "first sentence" "second sentence"
//   node src/node.js --bundle DIR --sentences sentences.json --threads 2 --runs 20

import { readFile } from "node:fs/promises";
import path from "node:path";
import { parseArgs } from "node:util";

import * as ort from "onnxruntime-node";

import { benchmark } from "./bundle.js";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    bundle: { type: "string" },
    sentences: { type: "string" },
    threads: { type: "string", default: "2" },
    runs: { type: "string", default: "20" },
    warmup: { type: "string", default: "3" },
  },
});
if (!values.bundle) {
  console.error("usage: node src/node.js --bundle DIR [--sentences FILE.json] [--threads N] [--runs N] [SENTENCE ...]");
  process.exit(2);
}
const texts = values.sentences ? JSON.parse(await readFile(values.sentences, "utf8")) : positionals;
if (!texts.length) {
  console.error("no sentences: pass them as arguments or --sentences FILE.json (a JSON list of strings)");
  process.exit(2);
}

const load = async (name, kind) => {
  const file = path.join(values.bundle, name);
  return kind === "text" ? readFile(file, "utf8") : new Uint8Array(await readFile(file));
};
const threads = Number(values.threads);
const rssBefore = process.memoryUsage().rss;
const result = await benchmark({
  ort,
  load,
  texts,
  sessionOptions: { executionProviders: ["cpu"], intraOpNumThreads: threads, interOpNumThreads: 1 },
  runs: Number(values.runs),
  warmup: Number(values.warmup),
});
const { bundle, ...report } = result;
console.log(
  JSON.stringify({
    runtime: "onnxruntime-node",
    version: ort.env.versions?.node ?? null,
    node: process.version,
    threads,
    ...report,
    memory: {
      // Resident set of the whole Node process, as the OS reports it; maxRSS is in KiB.
      rssBeforeBytes: rssBefore,
      rssBytes: process.memoryUsage().rss,
      peakRssBytes: process.resourceUsage().maxRSS * 1024,
    },
    inputs: bundle.session.inputNames,
    outputs: bundle.session.outputNames,
  }),
);
