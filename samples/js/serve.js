#!/usr/bin/env node
// A static server for the page: samples/js at /, the bundle folder at /bundle/, on 127.0.0.1.
// It sends the COOP/COEP headers that make the page cross-origin isolated, so onnxruntime-web
// can use WebAssembly threads and the browser can measure the page's memory.
//
//   node serve.js --bundle ../../out/all-MiniLM-L6-v2-mobile [--port 8000]
// then open http://127.0.0.1:8000/web/

import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: { bundle: { type: "string" }, port: { type: "string", default: "8000" } },
});
if (!values.bundle) {
  console.error("usage: node serve.js --bundle DIR [--port N]   (port 0 picks a free one)");
  process.exit(2);
}
const root = path.dirname(fileURLToPath(import.meta.url));
const bundleRoot = path.resolve(values.bundle);
const types = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript",
  ".mjs": "text/javascript",
  ".json": "application/json",
  ".wasm": "application/wasm",
  ".css": "text/css",
};

function resolve(urlPath) {
  const decoded = decodeURIComponent(urlPath);
  const [base, relative] = decoded.startsWith("/bundle/")
    ? [bundleRoot, decoded.slice("/bundle/".length)]
    : [root, decoded.replace(/^\/+/, "")];
  const file = path.resolve(base, relative);
  // Never serve anything outside the two folders.
  return file === base || file.startsWith(base + path.sep) ? file : null;
}

const server = http.createServer(async (request, response) => {
  const url = new URL(request.url, "http://127.0.0.1");
  let file = resolve(url.pathname);
  try {
    if (file && (await stat(file)).isDirectory()) file = path.join(file, "index.html");
    const info = file && (await stat(file));
    if (!info?.isFile()) throw new Error("not a file");
    response.writeHead(200, {
      "Content-Type": types[path.extname(file)] ?? "application/octet-stream",
      "Content-Length": info.size,
      "Cross-Origin-Opener-Policy": "same-origin",
      "Cross-Origin-Embedder-Policy": "require-corp",
      "Cache-Control": "no-store",
    });
    createReadStream(file).pipe(response);
  } catch {
    response.writeHead(404, { "Content-Type": "text/plain" });
    response.end(`not found: ${url.pathname}\n`);
  }
});
server.listen(Number(values.port), "127.0.0.1", () => {
  // The test reads this line to learn the port.
  console.log(`serving http://127.0.0.1:${server.address().port}/web/ (bundle: ${bundleRoot})`);
});
