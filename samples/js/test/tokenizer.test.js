// Tokenisation: the ids Python's TextEncoder gives, truncation and padding by the contract.

import assert from "node:assert/strict";
import { before, describe, test } from "node:test";

import { BundleError, CONTRACT, encode, loadTokenizer } from "../src/bundle.js";
import { EXPECTED, FIXTURE, folderLoader, patchedLoader } from "./helpers.js";

const rows = (flat, batch, length) =>
  Array.from({ length: batch }, (_, b) => Array.from(flat.subarray(b * length, (b + 1) * length), Number));

describe("loadTokenizer and encode", () => {
  let tok;
  before(async () => {
    tok = await loadTokenizer(folderLoader(FIXTURE), "tokenizer.json");
  });

  test("finds the pad id from the [PAD] token", () => {
    assert.equal(tok.padId, 0);
  });

  test("prefers padding.pad_id from tokenizer.json", async () => {
    const json = JSON.parse(await folderLoader(FIXTURE)("tokenizer.json", "text"));
    json.padding = { pad_id: 4 };
    const patched = await loadTokenizer(patchedLoader({ "t.json": JSON.stringify(json) }), "t.json");
    assert.equal(patched.padId, 4);
  });

  test("gives Python's token ids and attention mask", () => {
    const encoded = encode(tok, EXPECTED.sentences);
    const length = EXPECTED.input_ids[0].length;
    assert.equal(encoded.batch, EXPECTED.sentences.length);
    assert.equal(encoded.length, length);
    assert.deepEqual(rows(encoded.inputIds, encoded.batch, length), EXPECTED.input_ids);
    assert.deepEqual(rows(encoded.attentionMask, encoded.batch, length), EXPECTED.attention_mask);
    assert.ok(encoded.tokenTypeIds.every((value) => value === 0n));
  });

  test("truncates to maxLength, keeping [CLS] and [SEP]", () => {
    const long = Array(200).fill("cat").join(" ");
    const encoded = encode(tok, [long]);
    assert.equal(encoded.length, CONTRACT.maxLength);
    const ids = Array.from(encoded.inputIds, Number);
    assert.equal(ids[0], 2);
    assert.equal(ids.at(-1), 3);
    assert.ok(ids.slice(1, -1).every((id) => id === 7));
    const short = encode(tok, [long], { maxLength: 8 });
    assert.deepEqual(Array.from(short.inputIds, Number), [2, 7, 7, 7, 7, 7, 7, 3]);
  });

  test("pads every row to a fixed sequence length", () => {
    const encoded = encode(tok, ["the cat"], { sequenceLength: 6 });
    assert.equal(encoded.length, 6);
    assert.deepEqual(Array.from(encoded.inputIds, Number), [2, 5, 7, 3, 0, 0]);
    assert.deepEqual(Array.from(encoded.attentionMask, Number), [1, 1, 1, 1, 0, 0]);
  });

  test("refuses an empty batch", () => {
    assert.throws(() => encode(tok, []), BundleError);
  });
});
