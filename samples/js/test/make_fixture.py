"""Regenerate test/fixtures: a tiny random BERT bundle and what Python's runtime makes of it.

Run from the repository root with lrt-deploy installed (``bash scripts/setup_tests.sh``):
    .venv/bin/python samples/js/test/make_fixture.py
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BUNDLE = FIXTURES / "tiny-bundle"
# Words of the tiny vocabulary in mixed case, punctuation and an unknown word.
SENTENCES = ["The cat sat on the mat.", "a small model runs fast on this phone", "zebra text"]


def _wordpiece(vocab: list[str]):
    """BERT's uncased WordPiece tokenizer over ``vocab`` (ids are list positions)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    tokenizer = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))],
    )
    return tokenizer


def main() -> None:
    """Export the tiny BERT for the CPU target and record Python's token ids and embeddings."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import VOCAB, save_tiny_bert

    from lrt_deploy.cli.export import main as lrt_export
    from lrt_deploy.runtime import Session, TextEncoder

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny-bert"
        save_tiny_bert(model)
        _wordpiece(VOCAB).save(str(model / "tokenizer.json"))
        out = Path(tmp) / "bundle"
        with contextlib.redirect_stdout(io.StringIO()):
            code = lrt_export([str(model), "--target", "cpu", "--no-verify-devices", "-q",
                               "-o", str(out)])
        if code != 0:
            raise SystemExit(f"lrt-export failed with exit code {code}")
        # The reports are not part of the contract an app reads, and not checksummed.
        for name in ("report.json", "report.md", "report.html"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(BUNDLE, ignore_errors=True)
        shutil.copytree(out, BUNDLE)

    session = Session(BUNDLE, threads=1)
    encoder = TextEncoder.from_bundle(BUNDLE)
    feeds = encoder.encode(SENTENCES, input_names=session.input_names)
    vectors = session.run(feeds)[session.output_names[0]]
    expected = {
        "sentences": SENTENCES,
        "input_ids": feeds["input_ids"].tolist(),
        "attention_mask": feeds["attention_mask"].tolist(),
        "output": session.output_names[0],
        "embeddings": [[round(float(v), 7) for v in row] for row in vectors],
    }
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in expected.items()]
    (FIXTURES / "expected.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {BUNDLE} and {FIXTURES / 'expected.json'}")


if __name__ == "__main__":
    main()
