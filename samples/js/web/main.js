// The page's glue: fetch the bundle's files, run bundle.js on onnxruntime-web (WebAssembly),
// show the result. With ?autorun=1 it runs at once and leaves the result in window.lrtResult
// (the headless-Chromium test reads it).

import * as ort from "onnxruntime-web";

import { benchmark } from "../src/bundle.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
if (params.has("bundle")) $("bundle").value = params.get("bundle");

// Threads need SharedArrayBuffer, i.e. a cross-origin isolated page (COOP/COEP headers).
const threads = Number(params.get("threads") ?? 2);
ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? threads : 1;
ort.env.wasm.wasmPaths = "/node_modules/onnxruntime-web/dist/";

async function browserMemory() {
  // The browser's own figure for this page (JS heap + WebAssembly memory); it needs
  // cross-origin isolation. performance.memory (JS heap only) is the fallback.
  if (globalThis.crossOriginIsolated && performance.measureUserAgentSpecificMemory) {
    const measured = await performance.measureUserAgentSpecificMemory();
    return { source: "performance.measureUserAgentSpecificMemory", bytes: measured.bytes };
  }
  if (performance.memory) {
    return { source: "performance.memory.usedJSHeapSize", bytes: performance.memory.usedJSHeapSize };
  }
  return { source: "unavailable", bytes: null };
}

async function embedPage() {
  const base = new URL($("bundle").value, location.href);
  const load = async (name, kind) => {
    const response = await fetch(new URL(name, base));
    if (!response.ok) throw new Error(`${response.status} fetching ${name} from ${base}`);
    return kind === "text" ? response.text() : new Uint8Array(await response.arrayBuffer());
  };
  const texts = params.has("sentences")
    ? JSON.parse(params.get("sentences"))
    : $("sentences").value.split("\n").map((line) => line.trim()).filter(Boolean);
  const result = await benchmark({
    ort,
    load,
    texts,
    sessionOptions: { executionProviders: ["wasm"] },
    runs: Number(params.get("runs") ?? 20),
    warmup: Number(params.get("warmup") ?? 3),
  });
  const { bundle, ...report } = result;
  return {
    runtime: "onnxruntime-web",
    backend: "wasm",
    version: ort.env.versions?.web ?? null,
    userAgent: navigator.userAgent,
    crossOriginIsolated: globalThis.crossOriginIsolated,
    threads: ort.env.wasm.numThreads,
    ...report,
    memory: await browserMemory(),
    inputs: bundle.session.inputNames,
    outputs: bundle.session.outputNames,
  };
}

async function main() {
  $("out").textContent = "running...";
  try {
    const result = await embedPage();
    window.lrtResult = result;
    const { embeddings, ...figures } = result;
    $("out").textContent = JSON.stringify(figures, null, 2) +
      `\n\n${embeddings.length} embeddings of ${embeddings[0].length} values`;
  } catch (error) {
    window.lrtResult = { error: String(error?.message ?? error) };
    $("out").textContent = `error: ${window.lrtResult.error}`;
  }
}

$("run").addEventListener("click", main);
if (params.get("autorun") === "1") main();
