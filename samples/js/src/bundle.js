// Open an lrt-deploy bundle through its manifest.json and embed sentences with it.
//
// The module is the same in Node and in a browser: the caller passes the ONNX Runtime module
// (onnxruntime-node or onnxruntime-web) and a `load(name, kind)` function that returns a file of
// the bundle as text or bytes (fs in Node, fetch in a page). The steps and names match
// samples/android (BundleEmbedder.kt) and follow samples/bundle-contract.json:
//   readManifest -> checkManifest -> loadTokenizer -> createSession -> encode -> run -> pool

import { Tokenizer } from "@huggingface/tokenizers";

/** The contract this module reads; tests compare it with samples/bundle-contract.json. */
export const CONTRACT = Object.freeze({
  contractVersion: 1,
  manifestFile: "manifest.json",
  formatVersion: 1,
  inputs: {
    input_ids: { dtype: "int64", rank: 2, required: true },
    attention_mask: { dtype: "int64", rank: 2, required: true },
    token_type_ids: { dtype: "int64", rank: 2, required: false, fill: "zeros" },
  },
  outputs: [
    { name: "sentence_embedding", rank: 2, pooling: "none", normalize: false },
    { name: "last_hidden_state", rank: 3, pooling: "mean", normalize: true },
  ],
  maxLength: 128,
  padTokenCandidates: ["[PAD]", "<pad>"],
});

/** Raised when a bundle does not follow the contract; the message says what to do. */
export class BundleError extends Error {
  constructor(message) {
    super(message);
    this.name = "BundleError";
  }
}

const now = () => globalThis.performance.now();

/** Step 1: parse manifest.json. */
export async function readManifest(load) {
  const text = await load(CONTRACT.manifestFile, "text");
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new BundleError(`${CONTRACT.manifestFile} is not valid JSON (${error.message}); re-export the bundle`);
  }
}

/**
 * Step 2: check the manifest against the contract and decide what to feed and what to read.
 * Returns {modelFile, tokenizerFile, inputs, output, sequenceLength}.
 */
export function checkManifest(manifest) {
  if (manifest.format_version !== CONTRACT.formatVersion) {
    throw new BundleError(
      `manifest format_version ${manifest.format_version} is not ${CONTRACT.formatVersion}; ` +
        "use the lrt-deploy version that matches this sample",
    );
  }
  const files = manifest.files ?? {};
  const modelFile = files.model ?? files.onnx;
  if (!modelFile) throw new BundleError("manifest names no model under files.model; re-export the bundle");
  if (!files.tokenizer) {
    throw new BundleError("manifest names no tokenizer under files.tokenizer; export a text model with its tokenizer");
  }
  const declared = new Map((manifest.inputs ?? []).map((spec) => [spec.name, spec]));
  for (const [name, rule] of Object.entries(CONTRACT.inputs)) {
    const spec = declared.get(name);
    if (!spec) {
      if (rule.required) throw new BundleError(`the model has no input '${name}'; it is not a text encoder bundle`);
      continue;
    }
    if (spec.dtype !== rule.dtype || spec.shape.length !== rule.rank) {
      throw new BundleError(
        `input '${name}' is ${spec.dtype} of rank ${spec.shape.length}, expected ${rule.dtype} of rank ${rule.rank}`,
      );
    }
  }
  const unknown = [...declared.keys()].filter((name) => !(name in CONTRACT.inputs));
  if (unknown.length) throw new BundleError(`the model takes inputs this sample cannot fill: ${unknown.join(", ")}`);
  const outputNames = new Set((manifest.outputs ?? []).map((spec) => spec.name));
  const output = CONTRACT.outputs.find((rule) => outputNames.has(rule.name));
  if (!output) {
    throw new BundleError(
      `the model outputs ${[...outputNames].join(", ")}; expected one of ` +
        CONTRACT.outputs.map((rule) => rule.name).join(", "),
    );
  }
  // A fixed sequence axis (--fixed-shape) means every batch is padded to exactly that length.
  const sequenceAxis = declared.get("input_ids").shape[1];
  const sequenceLength = Number.isInteger(sequenceAxis) && sequenceAxis > 0 ? sequenceAxis : null;
  // ONNX Runtime session config entries the bundle needs, and where its int8 kernels are exact.
  const devices = manifest.devices ?? {};
  const sessionConfig = devices.session_config ?? {};
  for (const [key, value] of Object.entries(sessionConfig)) {
    if (typeof value !== "string") {
      throw new BundleError(`manifest devices.session_config.${key} is not a string; re-export the bundle`);
    }
  }
  return {
    modelFile,
    tokenizerFile: files.tokenizer,
    inputs: [...declared.values()],
    output,
    sequenceLength,
    sessionConfig,
    exactOn: devices.exact_on ?? null,
  };
}

/** Session config entries ("session.a.b": "v") as ONNX Runtime JS's nested `extra` option. */
export function configExtra(sessionConfig) {
  const extra = {};
  for (const [key, value] of Object.entries(sessionConfig)) {
    const parts = key.split(".");
    let node = extra;
    for (const part of parts.slice(0, -1)) node = node[part] ??= {};
    node[parts.at(-1)] = value;
  }
  return extra;
}

/** Step 3: build the tokenizer from tokenizer.json (no network, no tokenizer_config.json). */
export async function loadTokenizer(load, tokenizerFile) {
  const json = JSON.parse(await load(tokenizerFile, "text"));
  const tokenizer = new Tokenizer(json, {});
  let padId = json.padding?.pad_id;
  for (const token of CONTRACT.padTokenCandidates) {
    if (padId !== undefined) break;
    padId = tokenizer.token_to_id(token);
  }
  return { tokenizer, padId: padId ?? 0 };
}

/** Step 4: create the ONNX Runtime session from the bytes of the bundle's model file. */
export async function createSession(ort, load, modelFile, sessionOptions = {}) {
  const bytes = await load(modelFile, "bytes");
  return ort.InferenceSession.create(bytes, sessionOptions);
}

/** Tokenize one text, truncated to maxLength tokens with its special tokens kept. */
function tokenizeOne(tokenizer, text, maxLength) {
  const encoded = tokenizer.encode(text);
  if (encoded.ids.length <= maxLength) return encoded.ids;
  // Truncate the text's own tokens, then let the post-processor add [CLS]/[SEP] (or the like),
  // as the Rust tokenizers do.
  if (!tokenizer.post_processor) return encoded.ids.slice(0, maxLength);
  const plain = tokenizer.tokenize(text, { add_special_tokens: false });
  const specials = encoded.ids.length - plain.length;
  const { tokens } = tokenizer.post_processor(plain.slice(0, maxLength - specials), null, true);
  return tokens.map((token) => tokenizer.token_to_id(token));
}

/**
 * Step 5: tokenize a batch into int64 input_ids / attention_mask / token_type_ids, padded on
 * the right to the longest text (or to the fixed sequence length).
 */
export function encode({ tokenizer, padId }, texts, { maxLength = CONTRACT.maxLength, sequenceLength = null } = {}) {
  if (!texts.length) throw new BundleError("no texts to embed; pass at least one string");
  const rows = texts.map((text) => tokenizeOne(tokenizer, text, sequenceLength ?? maxLength));
  const length = sequenceLength ?? Math.max(...rows.map((row) => row.length));
  const inputIds = new BigInt64Array(texts.length * length).fill(BigInt(padId));
  const attentionMask = new BigInt64Array(texts.length * length);
  rows.forEach((row, i) => {
    row.forEach((id, j) => {
      inputIds[i * length + j] = BigInt(id);
      attentionMask[i * length + j] = 1n;
    });
  });
  return { inputIds, attentionMask, tokenTypeIds: new BigInt64Array(texts.length * length), batch: texts.length, length };
}

/** Step 6: feed the model the inputs it declares and return the contract's output tensor. */
export async function run(ort, session, checked, encoded) {
  const dims = [encoded.batch, encoded.length];
  const arrays = {
    input_ids: encoded.inputIds,
    attention_mask: encoded.attentionMask,
    token_type_ids: encoded.tokenTypeIds,
  };
  const feeds = {};
  for (const spec of checked.inputs) feeds[spec.name] = new ort.Tensor("int64", arrays[spec.name], dims);
  const outputs = await session.run(feeds, [checked.output.name]);
  return outputs[checked.output.name];
}

/** Step 7: one vector per text: pooled over the attention mask and L2-normalised if asked. */
export function pool(output, rule, attentionMask) {
  const data = output.data;
  const [batch] = output.dims;
  const width = output.dims[output.dims.length - 1];
  const vectors = [];
  for (let b = 0; b < batch; b += 1) {
    let vector;
    if (rule.pooling === "none") {
      vector = Float32Array.from(data.subarray(b * width, (b + 1) * width));
    } else {
      const length = output.dims[1];
      vector = new Float32Array(width);
      let count = 0;
      for (let t = 0; t < length; t += 1) {
        if (attentionMask[b * length + t] === 0n) continue;
        count += 1;
        const offset = (b * length + t) * width;
        for (let k = 0; k < width; k += 1) vector[k] += data[offset + k];
      }
      for (let k = 0; k < width; k += 1) vector[k] /= Math.max(count, 1);
    }
    if (rule.normalize) {
      const norm = Math.hypot(...vector) || 1;
      for (let k = 0; k < width; k += 1) vector[k] /= norm;
    }
    vectors.push(vector);
  }
  return vectors;
}

/**
 * Open a bundle: every step up to a ready session, timed.
 *
 * @param {object} options
 * @param {object} options.ort onnxruntime-node or onnxruntime-web.
 * @param {(name: string, kind: "text"|"bytes") => Promise<string|Uint8Array>} options.load
 * @param {object} [options.sessionOptions] passed to InferenceSession.create.
 */
export async function openBundle({ ort, load, sessionOptions = {} }) {
  const start = now();
  const manifest = await readManifest(load);
  const checked = checkManifest(manifest);
  const tokenizer = await loadTokenizer(load, checked.tokenizerFile);
  const extra = { ...configExtra(checked.sessionConfig), ...(sessionOptions.extra ?? {}) };
  const session = await createSession(ort, load, checked.modelFile, { ...sessionOptions, extra });
  const openMs = now() - start;

  /** Embed a batch of texts; returns one Float32Array per text. */
  async function embed(texts) {
    const encoded = encode(tokenizer, texts, { sequenceLength: checked.sequenceLength });
    const output = await run(ort, session, checked, encoded);
    return pool(output, checked.output, encoded.attentionMask);
  }

  return { manifest, checked, tokenizer, session, embed, openMs };
}

/** Median, p90 and the first time of a list of milliseconds. */
export function summarize(times) {
  const sorted = [...times].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return { runs: times.length, medianMs: at(0.5), p90Ms: at(0.9), minMs: sorted[0], maxMs: sorted[sorted.length - 1] };
}

/**
 * Time a bundle the way lrt-deploy's reports do: open, first inference, warm-up, then runs.
 * Returns the embeddings of `texts` (from the first inference) and the timings.
 */
export async function benchmark({ ort, load, sessionOptions, texts, latencyTexts, warmup = 3, runs = 20 }) {
  const bundle = await openBundle({ ort, load, sessionOptions });
  let start = now();
  const vectors = await bundle.embed(texts);
  const firstInferenceMs = now() - start;
  const probe = latencyTexts ?? texts;
  for (let i = 0; i < warmup; i += 1) await bundle.embed(probe);
  const times = [];
  for (let i = 0; i < runs; i += 1) {
    start = now();
    await bundle.embed(probe);
    times.push(now() - start);
  }
  return {
    embeddings: vectors.map((vector) => Array.from(vector)),
    output: bundle.checked.output.name,
    modelFile: bundle.checked.modelFile,
    openMs: bundle.openMs,
    firstInferenceMs,
    latency: summarize(times),
    bundle,
  };
}
