// The manifest contract: what src/bundle.js reads from a bundle, and what it refuses.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { describe, test } from "node:test";

import { BundleError, CONTRACT, checkManifest, configExtra, readManifest } from "../src/bundle.js";
import { JS_DIR, MANIFEST, editedManifest, patchedLoader } from "./helpers.js";

describe("CONTRACT", () => {
  test("matches samples/bundle-contract.json", async () => {
    const file = path.join(JS_DIR, "..", "bundle-contract.json");
    const contract = JSON.parse(await readFile(file, "utf8"));
    assert.equal(CONTRACT.contractVersion, contract.contract_version);
    assert.equal(CONTRACT.manifestFile, contract.manifest.file);
    assert.equal(CONTRACT.formatVersion, contract.manifest.format_version);
    assert.deepEqual(CONTRACT.inputs, contract.inputs);
    assert.deepEqual(CONTRACT.outputs, contract.outputs);
    assert.equal(CONTRACT.maxLength, contract.tokenizer.max_length);
    assert.deepEqual(CONTRACT.padTokenCandidates, contract.tokenizer.pad_token_candidates);
  });
});

describe("readManifest", () => {
  test("parses the bundle's manifest.json", async () => {
    assert.deepEqual(await readManifest(patchedLoader({})), MANIFEST);
  });

  test("refuses a manifest that is not JSON", async () => {
    const load = patchedLoader({ "manifest.json": "{ not json" });
    await assert.rejects(readManifest(load), (error) => {
      assert.ok(error instanceof BundleError);
      assert.match(error.message, /manifest\.json is not valid JSON .*re-export the bundle/);
      return true;
    });
  });
});

describe("checkManifest", () => {
  test("picks the model, the tokenizer, the inputs and the output of the fixture", () => {
    const checked = checkManifest(MANIFEST);
    assert.equal(checked.modelFile, MANIFEST.files.model);
    assert.equal(checked.tokenizerFile, "tokenizer.json");
    assert.deepEqual(checked.inputs.map((spec) => spec.name), ["input_ids", "attention_mask", "token_type_ids"]);
    assert.equal(checked.output.name, "sentence_embedding");
    assert.equal(checked.output.pooling, "none");
    assert.equal(checked.sequenceLength, null, "dynamic sequence axis");
    assert.deepEqual(checked.sessionConfig, MANIFEST.devices.session_config);
    assert.deepEqual(checked.exactOn, MANIFEST.devices.exact_on);
  });

  test("falls back to files.onnx when files.model is absent", () => {
    const checked = checkManifest(editedManifest((m) => delete m.files.model));
    assert.equal(checked.modelFile, MANIFEST.files.onnx);
  });

  test("reads a fixed sequence length from the input shape", () => {
    const manifest = editedManifest((m) => {
      for (const spec of m.inputs) spec.shape = [1, 16];
    });
    assert.equal(checkManifest(manifest).sequenceLength, 16);
  });

  test("chooses mean pooling and L2 for last_hidden_state", () => {
    const manifest = editedManifest((m) => {
      m.outputs = [{ name: "last_hidden_state", dtype: "float32", shape: ["batch", "sequence", 32] }];
    });
    const { output } = checkManifest(manifest);
    assert.deepEqual(output, CONTRACT.outputs[1]);
  });

  test("accepts a bundle without token_type_ids", () => {
    const manifest = editedManifest((m) => {
      m.inputs = m.inputs.filter((spec) => spec.name !== "token_type_ids");
    });
    assert.equal(checkManifest(manifest).inputs.length, 2);
  });

  const refusals = [
    ["a newer format version", (m) => { m.format_version = 2; }, /format_version 2 is not 1/],
    ["no model file", (m) => { delete m.files.model; delete m.files.onnx; }, /names no model/],
    ["no tokenizer", (m) => { delete m.files.tokenizer; }, /names no tokenizer/],
    ["a missing required input", (m) => { m.inputs = m.inputs.slice(1); }, /no input 'input_ids'/],
    ["an input of the wrong dtype", (m) => { m.inputs[0].dtype = "int32"; },
      /input 'input_ids' is int32 of rank 2, expected int64 of rank 2/],
    ["an input of the wrong rank", (m) => { m.inputs[1].shape = ["batch"]; },
      /input 'attention_mask' is int64 of rank 1/],
    ["an input it cannot fill", (m) => { m.inputs.push({ name: "pixel_values", dtype: "float32", shape: [1, 3] }); },
      /cannot fill: pixel_values/],
    ["no known output", (m) => { m.outputs = [{ name: "logits", dtype: "float32", shape: [1, 3] }]; },
      /outputs logits; expected one of sentence_embedding, last_hidden_state/],
    ["a session config value that is not a string", (m) => { m.devices.session_config = { "a.b": 1 }; },
      /session_config\.a\.b is not a string/],
  ];
  for (const [what, edit, message] of refusals) {
    test(`refuses ${what}`, () => {
      assert.throws(() => checkManifest(editedManifest(edit)), (error) => {
        assert.ok(error instanceof BundleError, `${error}`);
        assert.match(error.message, message);
        return true;
      });
    });
  }
});

describe("configExtra", () => {
  test("nests dotted session config keys as onnxruntime-js's extra option", () => {
    const extra = configExtra({ "session.x.y": "1", "session.z": "0", top: "v" });
    assert.deepEqual(extra, { session: { x: { y: "1" }, z: "0" }, top: "v" });
  });

  test("is empty for an empty config", () => {
    assert.deepEqual(configExtra({}), {});
  });
});
