"""Linformer self-attention: keys and values projected along the sequence to ``k`` rows.

Attention costs ``O(n k)`` instead of ``O(n^2)``; the projection is a fixed ``k x max_length``
matrix, so the module has no data-dependent control flow and exports as plain MatMuls.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

__all__ = [
    "SHARE_MODES",
    "LinformerSelfAttention",
    "StandardSelfAttention",
]

logger = logging.getLogger(__name__)

SHARE_MODES = ("none", "headwise", "kv", "layerwise")


class LinformerSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values are compressed along the sequence.

    Sharing of the sequence projections (Wang et al., 2020, section 4):

    * ``"none"``: separate key and value projections per head (``2 * heads * k * n``).
    * ``"headwise"``: one key and one value projection shared by all heads (``2 * k * n``).
    * ``"kv"``: one projection shared by keys, values and heads (``k * n``).
    * ``"layerwise"``: one ``nn.Linear(max_length, k, bias=False)`` passed in as
      ``projection`` and shared by keys, values and every layer it is given to.

    Shorter inputs act as zero-padded to ``max_length``, masked positions are zeroed before
    the projection (padding never reaches the output), longer inputs raise ``ValueError``.

    Args:
        k: Rows kept by the projection; taken from ``projection`` for ``"layerwise"``.
        projection: The shared layer for ``"layerwise"``; must be None otherwise.

    Example:
        >>> attention = LinformerSelfAttention(64, 4, max_length=128, k=32)
        >>> attention(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        max_length: int,
        k: int | None = None,
        share: str = "none",
        projection: nn.Linear | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if share not in SHARE_MODES:
            raise ValueError(f"share must be one of {SHARE_MODES}, got {share!r}")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size})")
        if share == "layerwise":
            if not isinstance(projection, nn.Linear) or projection.bias is not None:
                raise ValueError(
                    "share='layerwise' needs projection=nn.Linear(max_length, k, bias=False), "
                    "the same instance for every layer that shares it"
                )
            if projection.in_features != max_length:
                raise ValueError(
                    f"projection maps {projection.in_features} positions but max_length is "
                    f"{max_length}: build it as nn.Linear({max_length}, k, bias=False)"
                )
            k = projection.out_features
        elif projection is not None:
            raise ValueError(f"projection is only used with share='layerwise', not {share!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_length:
            raise ValueError(f"k must be an int in [1, max_length={max_length}], got {k!r}")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.max_length = max_length
        self.k = k
        self.share = share
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.output = nn.Linear(hidden_size, hidden_size, bias=bias)

        def sequence_projection(heads: int) -> nn.Parameter:
            # std 1/sqrt(k) keeps the projected keys at the scale of the original ones.
            return nn.Parameter(torch.randn(heads, k, max_length) / math.sqrt(k))

        self.projection = projection
        self.key_projection: nn.Parameter | None = None
        self.value_projection: nn.Parameter | None = None
        if share == "none":
            self.key_projection = sequence_projection(num_heads)
            self.value_projection = sequence_projection(num_heads)
        elif share == "headwise":
            self.key_projection = sequence_projection(1)
            self.value_projection = sequence_projection(1)
        elif share == "kv":
            self.key_projection = sequence_projection(1)

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value projections shaped ``[heads or 1, k, max_length]``."""
        if self.projection is not None:
            shared = self.projection.weight.unsqueeze(0)
            return shared, shared
        if self.value_projection is None:
            return self.key_projection, self.key_projection
        return self.key_projection, self.value_projection

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _project(self, projection: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``projection`` ``[heads or 1, k, seq]`` along the sequence of ``x`` ``[batch, seq,
        hidden]``, split into heads: ``[batch, heads, k, head_dim]``."""
        if projection.shape[0] == 1:
            # One projection for all heads: a single k x seq by seq x hidden product before the
            # head split, instead of one thin (head_dim-wide) product per head.
            return self._split_heads(projection[0] @ x)
        return projection @ self._split_heads(x)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[batch, seq, hidden]`` attended to the ``k`` projected keys; ``attention_mask``
        ``[batch, seq]`` is 1 for real tokens."""
        length = hidden_states.shape[1]
        # A static shape under export, so this check leaves no branch in the graph.
        if length > self.max_length:
            raise ValueError(
                f"sequence length {length} exceeds max_length={self.max_length} of this "
                "Linformer attention: truncate the input, or build the module with a larger "
                "max_length"
            )
        query = self._split_heads(self.query(hidden_states))
        key = self.key(hidden_states)
        value = self.value(hidden_states)
        if attention_mask is not None:
            keep = attention_mask.to(key.dtype).unsqueeze(-1)
            key = key * keep
            value = value * keep
        key_projection, value_projection = self._projections()
        # Positions past the input would only meet zero padding: drop their projection columns
        # instead of padding the keys (same result, no copy; a constant slice under export).
        key_projection = key_projection[..., :length]
        value_projection = value_projection[..., :length]
        key = self._project(key_projection, key)  # [batch, heads, k, head_dim]
        value = self._project(value_projection, value)
        scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)
        context = scores.softmax(dim=-1) @ value
        batch = hidden_states.shape[0]
        context = context.transpose(1, 2).reshape(batch, length, self.hidden_size)
        return self.output(context)

    def to_standard_attention(self) -> StandardSelfAttention:
        """A new standard-attention module with copies of the four maps' weights: the cost
        baseline, a different function (not a fidelity reference)."""
        standard = StandardSelfAttention(
            self.hidden_size, self.num_heads, bias=self.query.bias is not None
        ).to(device=self.query.weight.device, dtype=self.query.weight.dtype)
        standard.load_state_dict(
            {
                f"{name}.{param}": tensor
                for name in ("query", "key", "value", "output")
                for param, tensor in getattr(self, name).state_dict().items()
            }
        )
        return standard.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"max_length={self.max_length}, k={self.k}, share={self.share!r}"
        )


class StandardSelfAttention(nn.Module):
    """Multi-head softmax self-attention with ``LinformerSelfAttention``'s call signature.

    Written with ``scaled_dot_product_attention`` so that the exported graph fuses into one
    attention kernel: a fair dense baseline.
    """

    def __init__(self, hidden_size: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size})")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.output = nn.Linear(hidden_size, hidden_size, bias=bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[batch, seq, hidden]`` attended to every real position (``attention_mask`` 1)."""
        query = self._split_heads(self.query(hidden_states))
        key = self._split_heads(self.key(hidden_states))
        value = self._split_heads(self.value(hidden_states))
        bias = None
        if attention_mask is not None:
            # Additive [batch, 1, 1, seq] mask with the float minimum (not -inf), as BERT does.
            blocked = attention_mask[:, None, None, :] == 0
            bias = torch.zeros(blocked.shape, dtype=query.dtype, device=query.device)
            bias = bias.masked_fill(blocked, torch.finfo(query.dtype).min)
        context = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        batch, length = hidden_states.shape[:2]
        context = context.transpose(1, 2).reshape(batch, length, self.hidden_size)
        return self.output(context)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_heads={self.num_heads}"
