"""Turn strings into model inputs with a bundle's ``tokenizer.json``.

Uses the Rust ``tokenizers`` package only (no transformers, no torch); it is an optional
dependency imported when a :class:`TextEncoder` is created.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.errors import BundleError

from .bundle import checked_file, read_manifest

__all__ = ["TextEncoder"]

logger = logging.getLogger(__name__)

_PAD_TOKENS = ("[PAD]", "<pad>")


class TextEncoder:
    """Tokenize text into ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64).

    Args:
        tokenizer_json_path: Path to a Hugging Face ``tokenizer.json`` file.
        max_length: Longer texts are truncated to this many tokens (special tokens included).
        pad_to: Pad every batch to exactly this length (for models exported with
            ``--fixed-shape``); must be <= ``max_length``. None pads to the longest text in
            the batch.

    Raises:
        ImportError: If the ``tokenizers`` package is not installed.
        ValueError: If ``pad_to`` exceeds ``max_length``.
    """

    def __init__(
        self,
        tokenizer_json_path: str | os.PathLike[str],
        max_length: int = 128,
        pad_to: int | None = None,
    ) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError(
                "TextEncoder needs the 'tokenizers' package: pip install tokenizers"
            ) from error
        if pad_to is not None and pad_to > max_length:
            raise ValueError(f"pad_to={pad_to} is longer than max_length={max_length}")
        self.max_length = max_length
        self.pad_to = pad_to
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json_path))
        pad_id, pad_token = self._pad_token()
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=pad_to)

    @classmethod
    def from_bundle(
        cls,
        bundle: str | os.PathLike[str],
        max_length: int = 128,
        pad_to: int | None = None,
        *,
        verify: bool = True,
    ) -> TextEncoder:
        """Create an encoder from the tokenizer named in a bundle's ``manifest.json``.

        Args:
            bundle: Bundle folder.
            max_length: See the class docstring.
            pad_to: See the class docstring.
            verify: Check ``tokenizer.json`` against the manifest's SHA-256 first.

        Raises:
            BundleError: If the bundle has no tokenizer, or it lies outside the bundle or does
                not match its checksum.
        """
        folder = Path(bundle)
        manifest = read_manifest(folder)
        path = checked_file(folder, manifest, "tokenizer", verify=verify)
        if path is None:
            raise BundleError(f"bundle '{folder}' has no tokenizer file: it is not a text model")
        return cls(path, max_length=max_length, pad_to=pad_to)

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
            ValueError: If ``texts`` is an empty list.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise ValueError("texts is empty; pass at least one string")
        if not all(isinstance(text, str) for text in batch):
            raise TypeError("texts must be strings")
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
        """The shortest whitespace-cut prefix of ``text`` that still fills ``max_length`` tokens.

        The tokenizer truncates only after encoding the whole text (memory grows with the text:
        ~0.7 GB per million words), so long texts are cut first. A prefix cut at whitespace
        encodes its words exactly as the full text does, so once it yields ``max_length`` real
        tokens the truncated result is identical; otherwise the prefix grows fourfold.
        """
        length = self.max_length * 16
        while length < len(text):
            cut = max(text.rfind(space, length // 2, length) for space in " \n\t\r")
            prefix = text[: cut if cut > 0 else length]
            if sum(self._tokenizer.encode(prefix).attention_mask) >= self.max_length:
                return prefix
            length *= 4
        return text
