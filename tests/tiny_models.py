"""Tiny seeded models the tests build in code (importable by name for pickles and --factory)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "the", "a", "cat", "dog", "sat", "on", "mat", "low", "rank", "model", "runs", "fast",
    "phone", "small", "text", "is", "and", "of", "to", "in", "it", "this", "that", "with", "for",
]


class TinyEncoder(nn.Module):
    """Embedding + two feed-forward blocks: enough Linears for factorization to matter."""

    def __init__(self, vocab: int = 50, hidden: int = 32, ffn: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        x = self.norm(x + self.down(torch.relu(self.up(x))))
        return self.head(x)

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1)),)


class TinyMLP(nn.Module):
    """Float input, no example_inputs(): the user must describe its input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 48)
        self.fc2 = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyLRTByDesign(nn.Module):
    """Trained-by-design LRT: a greenformer-style LED (two Linears, no bias between)."""

    def __init__(self) -> None:
        super().__init__()
        self.led = nn.Sequential(nn.Linear(32, 4, bias=False), nn.Linear(4, 32))
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.led(x)))

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(2, 32, generator=torch.Generator().manual_seed(2)),)


def make_tiny_encoder() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder().eval()


def make_tiny_mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP().eval()


def save_tiny_bert(
    folder, *, sentence_transformers: bool = True, classifier: bool = False
) -> None:
    """A 2-layer BERT with random weights, a WordPiece tokenizer, and (optionally) the
    sentence-transformers pooling files, saved as a Hugging Face folder."""
    import json
    from pathlib import Path

    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    if classifier:
        from transformers import BertForSequenceClassification

        config.num_labels = 3
        BertForSequenceClassification(config).eval().save_pretrained(folder)
    else:
        BertModel(config).eval().save_pretrained(folder)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(vocab_file)).save_pretrained(folder)
    if sentence_transformers:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"},
        ]))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
        )


# Set by TrapEncoder.__setstate__: proves whether unpickling ran the file's code.
TRAP_FIRED: list[str] = []


class TrapEncoder(TinyEncoder):
    """A TinyEncoder whose unpickling records that code from the file ran."""

    def __setstate__(self, state: dict) -> None:
        TRAP_FIRED.append("__setstate__")
        super().__setstate__(state)


class NoisyEncoder(TinyEncoder):
    """Non-deterministic output: an exported graph cannot match its PyTorch reference."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        return out + torch.randn_like(out)


class TinyLowRankMLP(nn.Module):
    """Two LowRankLinear layers (rank 4) around a nonlinearity; 3-D input so each factor
    exports as a MatMul (2-D inputs export as Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        from lrt_deploy.nn import LowRankLinear

        self.fc1 = LowRankLinear(32, 48, rank=4)
        self.fc2 = LowRankLinear(48, 8, rank=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)),)


# Broken --factory targets for the hardening tests.
NOT_CALLABLE = 42


def raising_factory() -> torch.nn.Module:
    raise RuntimeError("the factory's own bug")


def factory_needing_arguments(width: int) -> torch.nn.Module:
    return torch.nn.Linear(width, width)


def exiting_factory() -> torch.nn.Module:
    import sys

    sys.exit(3)
