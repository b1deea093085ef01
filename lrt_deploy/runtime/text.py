"""Turn strings into model inputs with a bundle's ``tokenizer.json`` (``tokenizers`` only)."""

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
    """Texts or encoder settings the encoder cannot take; a ValueError and a TypeError both."""


def _components(node: Any) -> list[str] | None:
    """Type names of a normalizer/pre-tokenizer, flattening ``Sequence``; None when absent."""
    if node is None:
        return None
    if node.get("type") == "Sequence":
        inner = node.get("normalizers", node.get("pretokenizers")) or []
        return [name for child in inner for name in (_components(child) or [])]
    return [str(node.get("type"))]


def _cut_pattern(config: Mapping[str, Any]) -> re.Pattern[str]:
    """Where a text may be cut: before ASCII whitespace, and before a CJK ideograph where BERT's
    normalizer puts spaces around them."""
    normalizer = config.get("normalizer") or {}
    if normalizer.get("type") == "BertNormalizer" and normalizer.get("handle_chinese_chars"):
        return re.compile("[ \n\t\r\u3400-\u4dbf\u4e00-\u9fff]")
    return re.compile("[ \n\t\r]")


def cut_is_exact(config: Mapping[str, Any]) -> bool:
    """Whether the part of a text before an ASCII whitespace tokenizes to a prefix of the whole
    text's tokens under this ``tokenizer.json``.

    It holds when normalizers map characters one by one, pre-tokenizers split on whitespace
    (so no word spans a cut; every model type works word by word) and no added token holds
    whitespace.
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
    """Tokenize text into int64 ``input_ids``, ``attention_mask`` and ``token_type_ids``.

    Args:
        max_length: Longer texts are truncated to this many tokens (special tokens included).
        pad_to: Pad every batch to exactly this length (fixed-shape models), at most
            ``max_length``; None pads to the batch's longest text.
        max_sequence: The model's positions (``text.max_sequence``), a bound on both lengths.
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
        """An encoder from a bundle's checked ``tokenizer.json``, bounded by the model's positions;
        ``max_length`` defaults to ``pad_to``, else 128 or the model's positions if fewer."""
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
        """Int64 arrays of shape ``(len(texts), length)`` for one string or a list of them; only
        ``input_names`` when given (e.g. ``session.input_names``)."""
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
        """A prefix of ``text`` that encodes to the same truncated tokens, or ``text`` itself.

        The tokenizer truncates only after encoding the whole text, so long texts are cut first
        where :func:`cut_is_exact` allows it, never inside a word.
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
    """:class:`TextInputError` unless both lengths are whole numbers >= 1, ``pad_to <=
    max_length``, both within ``max_sequence`` and one padded text fits in memory."""
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
