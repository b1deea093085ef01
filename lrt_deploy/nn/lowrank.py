"""Low-rank layers: an ``out x in`` weight stored as ``D @ E`` (``out x r``, ``r x in``).

They cost ``r * (in + out)`` parameters instead of ``in * out`` and export as two MatMuls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from lrt_deploy.nn.factors import embedding_factors, svd_factors

__all__ = [
    "lowrank_layers_in_weights",
    "LowRankEmbedding",
    "LowRankLinear",
    "is_lowrank_pair",
    "lowrank_rank",
]

logger = logging.getLogger(__name__)


def _check_rank(rank: int, full_rank: int | None = None) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if full_rank is not None and rank > full_rank:
        raise ValueError(
            f"rank must be an int in [1, {full_rank}] (the full rank of this layer), got {rank!r}"
        )


class LowRankLinear(nn.Module):
    """A linear layer factored as ``decoder(encoder(x))`` with a rank-``rank`` bottleneck; only
    the decoder has a bias.

    Example:
        >>> layer = LowRankLinear.from_dense(nn.Linear(64, 32), rank=8)
        >>> layer(torch.randn(4, 64)).shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.encoder = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.decoder = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    @classmethod
    def from_factors(
        cls,
        decoder_weight: torch.Tensor,
        encoder_weight: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> LowRankLinear:
        """A layer computing ``x @ (decoder_weight @ encoder_weight).T + bias``, on the factors'
        device and dtype (``out x r`` and ``r x in``)."""
        if decoder_weight.dim() != 2 or encoder_weight.dim() != 2:
            raise ValueError("decoder_weight and encoder_weight must both be 2-D matrices")
        out_features, rank = decoder_weight.shape
        enc_rank, in_features = encoder_weight.shape
        if enc_rank != rank:
            raise ValueError(
                f"factor shapes do not chain: decoder is {tuple(decoder_weight.shape)} but "
                f"encoder is {tuple(encoder_weight.shape)}; expected (out, r) and (r, in)"
            )
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls(
            in_features,
            out_features,
            rank,
            bias=bias is not None,
            device=decoder_weight.device,
            dtype=decoder_weight.dtype,
        )
        with torch.no_grad():
            layer.encoder.weight.copy_(encoder_weight)
            layer.decoder.weight.copy_(decoder_weight)
            if bias is not None:
                layer.decoder.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """``linear``'s rank-``rank`` truncated SVD with balanced factors, on its device and
        dtype; exact at full rank."""
        _check_rank(rank, min(linear.in_features, linear.out_features))
        decoder_weight, encoder_weight = svd_factors(linear.weight.detach(), rank)
        dtype = linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_factors(decoder_weight.to(dtype), encoder_weight.to(dtype), bias)

    def to_dense(self) -> nn.Linear:
        """Multiply the factors back into a single ``nn.Linear``."""
        weight = self.decoder.weight.detach() @ self.encoder.weight.detach()
        bias = self.decoder.bias
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.detach())
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.decoder.bias is not None}"
        )


class LowRankEmbedding(nn.Module):
    """An embedding table as ``projection(table(ids))``: ``num_embeddings x rank`` codes and a
    bias-free ``rank -> embedding_dim`` projection; the ``padding_idx`` row stays exactly zero."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rank = rank
        self.table = nn.Embedding(
            num_embeddings, rank, padding_idx=padding_idx, device=device, dtype=dtype
        )
        self.projection = nn.Linear(rank, embedding_dim, bias=False, device=device, dtype=dtype)

    @property
    def padding_idx(self) -> int | None:
        """The padding row as a non-negative index, as ``nn.Embedding`` normalises it."""
        return self.table.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.table(input_ids))

    @classmethod
    def from_factors(
        cls,
        codes: torch.Tensor,
        basis: torch.Tensor,
        padding_idx: int | None = None,
    ) -> LowRankEmbedding:
        """An embedding whose table is ``codes @ basis`` (``num x r``, ``r x dim``), on the
        factors' device and dtype, with the ``padding_idx`` code zeroed."""
        if codes.dim() != 2 or basis.dim() != 2 or codes.shape[1] != basis.shape[0]:
            raise ValueError(
                f"factor shapes do not chain: codes {tuple(codes.shape)} and basis "
                f"{tuple(basis.shape)}; expected (num_embeddings, r) and (r, embedding_dim)"
            )
        num_embeddings, rank = codes.shape
        module = cls(
            num_embeddings,
            basis.shape[1],
            rank,
            padding_idx=padding_idx,
            device=codes.device,
            dtype=codes.dtype,
        )
        with torch.no_grad():
            module.table.weight.copy_(codes)
            module.projection.weight.copy_(basis.T)
            # The factors only approximate the zero padding row; masking relies on exact zeros.
            if module.padding_idx is not None:
                module.table.weight[module.padding_idx].zero_()
        return module

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, rank: int) -> LowRankEmbedding:
        """``embedding``'s rank-``rank`` truncated SVD, on its device and dtype with its padding
        row; ``max_norm`` is refused (it rewrites rows at lookup time)."""
        if embedding.max_norm is not None:
            raise ValueError("embeddings with max_norm cannot be factorized; keep them dense")
        _check_rank(rank, min(embedding.num_embeddings, embedding.embedding_dim))
        codes, basis = embedding_factors(embedding.weight.detach(), rank)
        dtype = embedding.weight.dtype
        return cls.from_factors(codes.to(dtype), basis.to(dtype), embedding.padding_idx)

    def to_dense(self) -> nn.Embedding:
        """Multiply the factors back into a single ``nn.Embedding``."""
        weight = self.table.weight.detach() @ self.projection.weight.detach().T
        embedding = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            padding_idx=self.padding_idx,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            embedding.weight.copy_(weight)
        return embedding

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return text


def _is_led_sequential(module: nn.Module) -> bool:
    # greenformer's LED: Sequential(Linear(in, r, bias=False), Linear(r, out)) with r below the
    # full rank; a wider "bottleneck" is just two dense layers, not a low-rank unit.
    if type(module) is not nn.Sequential or len(module) != 2:
        return False
    first, second = module[0], module[1]
    if type(first) is not nn.Linear or type(second) is not nn.Linear:
        return False
    if first.bias is not None or first.out_features != second.in_features:
        return False
    return first.out_features < min(first.in_features, second.out_features)


def is_lowrank_pair(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight as two low-rank factors: ``LowRankLinear``,
    ``LowRankEmbedding`` or ``Sequential(Linear(in, r, bias=False), Linear(r, out))``,
    ``r < min(in, out)``."""
    return isinstance(module, (LowRankLinear, LowRankEmbedding)) or _is_led_sequential(module)


def lowrank_rank(module: nn.Module) -> int | None:
    """The bottleneck rank of a low-rank unit (see :func:`is_lowrank_pair`), else None."""
    if isinstance(module, (LowRankLinear, LowRankEmbedding)):
        return module.rank
    if _is_led_sequential(module):
        return module[0].out_features
    return None


def lowrank_layers_in_weights(state: Mapping[str, torch.Tensor]) -> list[dict[str, object]]:
    """Low-rank units recognised by parameter layout alone (for graphs whose module classes are
    gone): one dict per unit with ``name``, ``rank``, ``shape`` (out, in) and ``type``."""
    layouts = (
        ("encoder.weight", "decoder.weight", "LowRankLinear"),
        ("table.weight", "projection.weight", "LowRankEmbedding"),
        ("0.weight", "1.weight", "LED Sequential"),
    )
    found = []
    for key, first in state.items():
        for first_name, second_name, kind in layouts:
            if not key.endswith(first_name) or (key != first_name and
                                                not key.endswith("." + first_name)):
                continue
            prefix = key[: -len(first_name)]
            second = state.get(prefix + second_name)
            if second is None or first.dim() != 2 or second.dim() != 2:
                continue
            if kind == "LED Sequential" and prefix + "0.bias" in state:
                continue
            if kind == "LowRankEmbedding":
                rank, shape = first.shape[1], (first.shape[0], second.shape[0])
                if second.shape[1] != rank:
                    continue
            else:
                rank, shape = first.shape[0], (second.shape[0], first.shape[1])
                if second.shape[1] != rank:
                    continue
            if rank < min(shape):
                found.append({"name": prefix.rstrip("."), "rank": int(rank),
                              "shape": [int(s) for s in shape], "type": kind})
    return found
