"""Build a generic English healing corpus from the software documentation on this machine.

    python benchmarks/doc_corpus.py OUT.txt [--roots DIR ...] [--max-lines 60000]

Reads docstrings of ``.py`` files and the prose of ``.md``/``.rst``/``.txt`` files under the
roots (default: this interpreter's site-packages and /usr/share/doc), splits it into sentences,
keeps prose-like ones (6-60 words, mostly letters, no code), deduplicates them, drops any line of
the shipped held-out sets, and writes one sentence per line in a seeded random order. What it
produces is only for local experiments: it is not shipped (the texts keep their own licences).
"""

from __future__ import annotations

import argparse
import ast
import random
import re
import site
import sys
from collections.abc import Iterator
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
CODE_HINTS = re.compile(r"(>>>|::|==|\{|\}|\[|\]|_[a-z]|\(\)|=|\\|`|\*\*|#|<|>|\|)")


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _prose(path: Path) -> Iterator[str]:
    try:
        yield path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return


def _sentences(text: str) -> Iterator[str]:
    # Paragraphs are separated by blank lines; lines inside one are joined.
    for paragraph in re.split(r"\n\s*\n", text):
        joined = " ".join(line.strip() for line in paragraph.splitlines())
        for sentence in SENTENCE_END.split(joined):
            sentence = sentence.strip()
            words = sentence.split()
            if not 6 <= len(words) <= 60 or sentence[-1] not in ".!?":
                continue
            if CODE_HINTS.search(sentence) or not sentence[0].isupper():
                continue
            letters = sum(c.isalpha() or c.isspace() for c in sentence)
            if letters < 0.9 * len(sentence):
                continue
            yield sentence


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--roots", nargs="+", type=Path,
                        default=[*map(Path, site.getsitepackages()), Path("/usr/share/doc")])
    parser.add_argument("--max-lines", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from lrt_deploy.data.readers import DOMAIN_HELDOUT_TEXT as DOMAIN_HELDOUT
    from lrt_deploy.data.readers import HELDOUT_TEXT as HELDOUT
    from lrt_deploy.data.stream import shipped_lines

    excluded = set()
    for name in (HELDOUT, DOMAIN_HELDOUT, "calibration.txt"):
        try:
            excluded.update(line.lower() for line in shipped_lines(name))
        except FileNotFoundError:
            print(f"note: {name} not found, not excluded", file=sys.stderr)
    seen: set[str] = set()
    kept: list[str] = []
    for root in args.roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.stat().st_size > 2_000_000:
                continue
            suffix = path.suffix.lower()
            texts = (_docstrings(path) if suffix == ".py"
                     else _prose(path) if suffix in (".md", ".rst", ".txt") else ())
            for text in texts:
                for sentence in _sentences(text):
                    key = sentence.lower()
                    if key in seen or key in excluded:
                        continue
                    seen.add(key)
                    kept.append(sentence)
    random.Random(args.seed).shuffle(kept)
    kept = kept[: args.max_lines]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    size = args.out.stat().st_size
    print(f"{len(kept)} sentences ({size / 1e6:.1f} MB) from {len(seen)} unique -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
