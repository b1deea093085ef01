// Shared helpers of the tests: the fixture bundle, Python's expected results, file loaders.

import { readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const JS_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const FIXTURE = path.join(JS_DIR, "test", "fixtures", "tiny-bundle");
export const EXPECTED = JSON.parse(
  await readFile(path.join(JS_DIR, "test", "fixtures", "expected.json"), "utf8"),
);
export const MANIFEST = JSON.parse(await readFile(path.join(FIXTURE, "manifest.json"), "utf8"));

/** A bundle loader over a folder, as src/node.js builds it. */
export function folderLoader(folder) {
  return async (name, kind) => {
    const file = path.join(folder, name);
    return kind === "text" ? readFile(file, "utf8") : new Uint8Array(await readFile(file));
  };
}

/** A loader that serves `files` (name -> text) and the fixture for every other name. */
export function patchedLoader(files) {
  const fallback = folderLoader(FIXTURE);
  return async (name, kind) => (name in files ? files[name] : fallback(name, kind));
}

/** A deep copy of the fixture's manifest with `edit` applied. */
export function editedManifest(edit) {
  const manifest = structuredClone(MANIFEST);
  edit(manifest);
  return manifest;
}

/** Largest absolute difference between two equally long number lists. */
export function maxAbsDiff(a, b) {
  let worst = 0;
  for (let i = 0; i < a.length; i += 1) worst = Math.max(worst, Math.abs(a[i] - b[i]));
  return worst;
}
