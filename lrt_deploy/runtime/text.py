"""Turn strings into model inputs with a bundle's ``tokenizer.json``.

Uses the Rust ``tokenizers`` package only (no transformers, no torch); it is an optional
dependency imported when a :class:`TextEncoder` is created.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.errors import BundleError, LrtDeployError

from .bundle import checked_file, read_manifest
from .limits import BYTES_PER_TOKENIZED_TOKEN, check_memory

__all__ = ["TextEncoder", "TextInputError"]

logger = logging.getLogger(__name__)

_PAD_TOKENS = ("[PAD]", "<pad>")
# Lengths past this overflow the tokenizer's 32-bit sizes (and no model has the positions).
_MAX_TOKENS = 2**31 - 1
# Where a long text may be cut: whitespace to every normalizer and pre-tokenizer below.
_CUT_CHARACTERS = (" ", "\n", "\t", "\r")
# Normalizers that map each character on its own (Unicode normalization is stable across a
# space: a starter that composes with nothing before it) and keep a space a space.
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
# Pre-tokenizers that split on whitespace and drop it, so no word spans a space ...
_WHITESPACE_SPLITTERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
# ... and ones that only split words further, leaving their characters as they are.
_PURE_SPLITTERS = {"Punctuation", "Digits", "UnicodeScripts"}


class TextInputError(LrtDeployError, TypeError):
    """Texts or encoder settings the encoder cannot take (a ValueError and a TypeError, so
    callers catching either keep working); the message says what to pass instead."""


def _components(node: Any) -> list[str] | None:
    """Type names of a normalizer/pre-tokenizer, flattening ``Sequence``; None when absent."""
    if node is None:
        return None
    if node.get("type") == "Sequence":
        inner = node.get("normalizers", node.get("pretokenizers")) or []
        return [name for child in inner for name in (_components(child) or [])]
    return [str(node.get("type"))]


def _cut_pattern(config: Mapping[str, Any]) -> re.Pattern[str]:
    """Where a text may be cut: before ASCII whitespace; with BERT's normalizer alone (which
    puts spaces around every CJK ideograph) before a CJK ideograph too."""
    normalizer = config.get("normalizer") or {}
    if normalizer.get("type") == "BertNormalizer" and normalizer.get("handle_chinese_chars"):
        return re.compile("[ \n\t\r\u3400-\u4dbf\u4e00-\u9fff]")
    return re.compile("[ \n\t\r]")


def cut_is_exact(config: Mapping[str, Any]) -> bool:
    """Whether cutting a text just before an ASCII space/tab/newline and tokenizing the part
    before the cut gives a prefix of the whole text's tokens, for this ``tokenizer.json``.

    True when (a) every normalizer maps characters one by one and keeps whitespace
    whitespace, (b) the pre-tokenizers split on whitespace and drop it (others may only split
    further), so every word the model sees lies wholly on one side of the cut and the model
    (WordPiece, BPE, Unigram, WordLevel: all work word by word) tokenizes it alike, and (c) no
    added token contains whitespace (those are matched across words). Special tokens are added
    after truncation, so the truncated result is then identical. Anything else: False, and
    texts are tokenized whole.
    """
    normalizers = _components(config.get("normalizer")) or []
    splitters = _components(config.get("pre_tokenizer")) or []
    added = [str(token.get("content", "")) for token in config.get("added_tokens") or []]
    return (all(name in _LOCAL_NORMALIZERS for name in normalizers)
            and any(name in _WHITESPACE_SPLITTERS for name in splitters)
            and all(name in _WHITESPACE_SPLITTERS | _PURE_SPLITTERS for name in splitters)
            and not any(c in content for content in added for c in _CUT_CHARACTERS))


def _texts(texts: object) -> list[str]:
    """One string or an ordered collection of strings, as a list; anything else refused."""
    if isinstance(texts, str):
        return [texts]
    if (isinstance(texts, Mapping | AbstractSet | bytes | bytearray | memoryview)
            or not isinstance(texts, Iterable)):
        raise TextInputError(
            f"texts must be a string or a list of strings, got {type(texts).__name__}: pass "
            "str (decode bytes first, e.g. data.decode('utf-8'))"
        )
    batch = list(texts)
    wrong = next((i for i, text in enumerate(batch) if not isinstance(text, str)), None)
    if wrong is not None:
        raise TextInputError(
            f"texts[{wrong}] is {type(batch[wrong]).__name__}, not a string: pass a list of "
            "str (decode bytes first, e.g. data.decode('utf-8'))"
        )
    return batch


class TextEncoder:
    """Tokenize text into ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64).

    Args:
        tokenizer_json_path: Path to a Hugging Face ``tokenizer.json`` file.
        max_length: Longer texts are truncated to this many tokens (special tokens included).
        pad_to: Pad every batch to exactly this length (for models exported with
            ``--fixed-shape``); must be <= ``max_length``. None pads to the longest text in
            the batch.
        max_sequence: The most positions the model has (the manifest's
            ``text.max_sequence``; :meth:`from_bundle` passes it): ``max_length`` and
            ``pad_to`` may not exceed it. None: no model limit, only the memory one.

    Raises:
        ImportError: If the ``tokenizers`` package is not installed.
        TextInputError: If ``max_length``/``pad_to`` are not whole numbers >= 1, ``pad_to``
            exceeds ``max_length``, either exceeds ``max_sequence``, or one padded text would
            not fit in memory.
    """

    def __init__(
        self,
        tokenizer_json_path: str | os.PathLike[str],
        max_length: int = 128,
        pad_to: int | None = None,
        *,
        max_sequence: int | None = None,
    ) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError(
                "TextEncoder needs the 'tokenizers' package: pip install tokenizers"
            ) from error
        check_lengths(max_length, pad_to, max_sequence)
        self.max_length = max_length
        self.pad_to = pad_to
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json_path))
        # Long texts are cut before tokenizing only where that provably changes no token.
        config = json.loads(self._tokenizer.to_str())
        self._exact_cut = cut_is_exact(config)
        self._cut_at = _cut_pattern(config)
        pad_id, pad_token = self._pad_token()
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=pad_to)

    @classmethod
    def from_bundle(
        cls,
        bundle: str | os.PathLike[str],
        max_length: int | None = None,
        pad_to: int | None = None,
        *,
        verify: bool = True,
    ) -> TextEncoder:
        """Create an encoder from the tokenizer named in a bundle's ``manifest.json``.

        Args:
            bundle: Bundle folder.
            max_length: See the class docstring; at most the model's positions
                (``text.max_sequence``). None: ``pad_to`` if given, else 128 or the model's
                positions when it has fewer.
            pad_to: See the class docstring.
            verify: Check ``tokenizer.json`` against the manifest's SHA-256 first.

        Raises:
            BundleError: If the bundle has no tokenizer, or it lies outside the bundle or does
                not match its checksum.
            TextInputError: If ``max_length`` or ``pad_to`` exceeds the model's positions.
        """
        folder = Path(bundle)
        manifest = read_manifest(folder)
        text = manifest.get("text")
        most = text.get("max_sequence") if isinstance(text, dict) else None
        most = most if isinstance(most, int) and not isinstance(most, bool) and most > 0 else None
        if max_length is None:
            max_length = pad_to if pad_to is not None else min(128, most or 128)
        # Before the tokenizer is read or hashed.
        check_lengths(max_length, pad_to, most)
        path = checked_file(folder, manifest, "tokenizer", verify=verify)
        if path is None:
            raise BundleError(f"bundle '{folder}' has no tokenizer file: it is not a text model")
        return cls(path, max_length=max_length, pad_to=pad_to, max_sequence=most)

    def _pad_token(self) -> tuple[int, str]:
        """Keep the tokenizer's own padding token; else use a conventional one, else id 0."""
        padding = self._tokenizer.padding
        if padding:
            return padding["pad_id"], padding["pad_token"]
        for token in _PAD_TOKENS:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id, token
        logger.warning("tokenizer has no padding token; padding with id 0")
        return 0, self._tokenizer.id_to_token(0) or ""

    def encode(
        self, texts: str | Sequence[str], input_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Tokenize a batch of texts.

        Args:
            texts: One string or a list of strings.
            input_names: Keep only these keys (pass ``session.input_names`` so a model without
                ``token_type_ids`` does not receive it). None keeps all three.

        Returns:
            ``input_ids``, ``attention_mask`` and ``token_type_ids``, each int64 of shape
            ``(len(texts), length)``.

        Raises:
            TextInputError: If ``texts`` is empty, or not a string or a list of strings (a
                dict, bytes, a set).
        """
        batch = _texts(texts)
        if not batch:
            raise TextInputError("texts is empty; pass at least one string")
        if self.pad_to is not None and len(batch) * self.pad_to > 2**22:
            check_memory(len(batch) * self.pad_to * BYTES_PER_TOKENIZED_TOKEN,
                         f"{len(batch)} texts padded to {self.pad_to} tokens",
                         "encode fewer texts at a time")
        encodings = self._tokenizer.encode_batch([self._bounded(text) for text in batch])
        arrays: dict[str, Any] = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        if input_names is None:
            return arrays
        return {name: array for name, array in arrays.items() if name in input_names}

    __call__ = encode

    def _bounded(self, text: str) -> str:
        """A prefix of ``text`` that encodes to the same truncated tokens, or ``text``.

        The tokenizer truncates only after encoding the whole text (memory grows with the text:
        ~0.7 GB per million words), so long texts are cut first, but only when
        :func:`cut_is_exact` holds for this tokenizer, and only just before an ASCII space,
        tab or newline (or a CJK ideograph, which BERT's normalizer surrounds with spaces):
        the part before such a cut encodes to a prefix of the whole text's
        tokens, so once it fills ``max_length`` the truncated result is identical. A window
        with no whitespace is never cut inside a word: the cut moves back to the last
        whitespace, and without one the text is encoded whole.
        """
        if not self._exact_cut:
            return text
        length = self.max_length * 16
        while length < len(text):
            cut = -1
            for start, end in ((length // 2, length), (0, length // 2)):
                for match in self._cut_at.finditer(text, start, end):
                    cut = match.start()
                if cut >= 0:
                    break
            if cut > 0:
                prefix = text[:cut]
                if sum(self._tokenizer.encode(prefix).attention_mask) >= self.max_length:
                    return prefix
            length *= 4
        return text


def check_lengths(max_length: object, pad_to: object, max_sequence: int | None) -> None:
    """``max_length`` and ``pad_to`` are whole numbers >= 1, ``pad_to <= max_length``, both
    within the model's ``max_sequence`` positions (when known), and one text padded to
    ``pad_to`` fits in memory; else one :class:`TextInputError` line naming the limit."""
    for name, value in (("pad_to", pad_to), ("max_length", max_length)):
        if value is None and name == "pad_to":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TextInputError(f"{name} must be a whole number >= 1, got {value!r}")
        if max_sequence is not None and value > max_sequence:
            raise TextInputError(
                f"{name}={value} is more than the model's {max_sequence} positions "
                f"(text.max_sequence): use {name}={max_sequence} or less"
            )
        if value > _MAX_TOKENS:
            raise TextInputError(f"{name}={value} is more than the {_MAX_TOKENS} tokens a "
                                 f"tokenizer handles: use {name}={_MAX_TOKENS} or less")
    if pad_to is not None and pad_to > max_length:
        raise TextInputError(f"pad_to={pad_to} is longer than max_length={max_length}: pad "
                             f"to at most max_length, or raise max_length to {pad_to}")
    if pad_to is not None:
        try:
            check_memory(pad_to * BYTES_PER_TOKENIZED_TOKEN, f"pad_to={pad_to}",
                         "pad to the length the model was exported with")
        except LrtDeployError as error:
            raise TextInputError(str(error)) from None
