"""An LRT model trained by design: every projection is a LowRankLinear from the start.

Trains a tiny bag-of-tokens classifier on a synthetic task for a few seconds on CPU, saves it with
``torch.export`` and prints the command that exports it (no --rank: it is already low-rank, and
lrt-export reads its ranks from the weights).

    python samples/lrt_by_design.py /tmp/lrt_classifier.pt2
    lrt-export /tmp/lrt_classifier.pt2 --target mobile -o out/lrt-classifier
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lrt_deploy.nn import LowRankEmbedding, LowRankLinear


class LowRankClassifier(nn.Module):
    def __init__(self, vocab: int = 1000, hidden: int = 128, rank: int = 16, classes: int = 4):
        super().__init__()
        self.embed = LowRankEmbedding(vocab, hidden, rank)
        self.ffn = nn.Sequential(LowRankLinear(hidden, 4 * hidden, rank), nn.GELU(),
                                 LowRankLinear(4 * hidden, hidden, rank))
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        x = x + self.ffn(x)
        return self.head(x.mean(dim=1))


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "lrt_classifier.pt2"
    torch.manual_seed(0)
    model = LowRankClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Synthetic task: the class is which quarter of the vocabulary most tokens come from.
    for step in range(200):
        labels = torch.randint(0, 4, (64,))
        tokens = labels[:, None] * 250 + torch.randint(0, 250, (64, 16))
        noise = torch.rand(64, 16) < 0.3
        tokens = torch.where(noise, torch.randint(0, 1000, (64, 16)), tokens)
        loss = nn.functional.cross_entropy(model(tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:3d} loss {loss.item():.3f}")
    model.eval()
    batch = torch.randint(0, 1000, (2, 16))
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    program = torch.export.export(model, (batch,), dynamic_shapes=dims)
    torch.export.save(program, path)
    print(f"saved {path}; export it with:")
    print(f"  lrt-export {path} --target mobile -o out/lrt-classifier")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
