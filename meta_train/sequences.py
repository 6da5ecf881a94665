"""What the MNIST MLP families lack (issue 20): sequence models and a residual conv net with BatchNorm.

* ``seq-transformer``: a 1-layer causal transformer (width 32) and ``seq-lstm``: an LSTM language model (width
  32), both predicting the next token of sequences from a random sparse Markov chain (16 tokens; each row of the
  transition matrix puts its mass on 3 successors). The drop-in benchmark's sequence loops (a copy task, other
  sizes) stay unseen.
* ``mnist-resnet-bn``: a residual conv net with BatchNorm (batch statistics) on MNIST at 14x14, minibatches of 64.

``general-seq`` (``meta_train/tasks.py``) is ``general`` plus these three.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from learnedopt.meta.tasks import ModuleFamily

from .mnist import _mnist

__all__ = ["markov_sequences", "TinyTransformer", "TinyLSTM", "residual_cnn", "SEQUENCE_FAMILIES",
           "sequence_family", "resnet_family"]

VOCAB, LENGTH = 16, 24


@lru_cache(maxsize=1)
def markov_sequences(count: int = 8192, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` token sequences from one random sparse Markov chain: inputs ``(count, LENGTH)`` and next-token
    targets of the same shape."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((VOCAB, VOCAB), -1e9)
    for row in range(VOCAB):
        successors = torch.randperm(VOCAB, generator=g)[:3]
        logits[row, successors] = torch.randn(3, generator=g)
    transitions = torch.softmax(logits, dim=1)
    tokens = torch.empty(count, LENGTH + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (count,), generator=g)
    for t in range(LENGTH):
        tokens[:, t + 1] = torch.multinomial(transitions[tokens[:, t]], 1, generator=g)[:, 0]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())


class TinyTransformer(nn.Module):
    """One pre-norm causal self-attention block and MLP, learned positions (width 32, 2 heads)."""

    def __init__(self, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(LENGTH, width) * 0.02)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.out = nn.Linear(width, VOCAB)
        self.heads = heads

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[-1]]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(-3, -2) for t in self.qkv(self.norm1(x)).chunk(3, -1))
        length = tokens.shape[-1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        # attention written out: scaled_dot_product_attention has no batching rule for vmap on CPUs
        scores = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~causal, float("-inf"))
        attended = scores.softmax(dim=-1) @ v
        x = x + self.proj(attended.transpose(-3, -2).flatten(-2))
        x = x + self.mlp(self.norm2(x))
        return self.out(self.norm3(x))


class TinyLSTM(nn.Module):
    """An LSTM language model written with ``nn.LSTMCell`` (width 32), so that it runs under ``vmap``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.cell = nn.LSTMCell(width, width)
        self.out = nn.Linear(width, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        h = c = x.new_zeros(*x.shape[:-2], self.cell.hidden_size)
        outputs = []
        for t in range(x.shape[-2]):
            h, c = self.cell(x[..., t, :], (h, c))
            outputs.append(h)
        return self.out(torch.stack(outputs, dim=-2))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


def residual_cnn(channels: int = 8) -> nn.Module:
    """Conv-BN-ReLU, one residual block, global average pooling, a linear classifier (MNIST at 14x14)."""
    return nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         _Residual(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


SEQUENCE_FAMILIES = {"seq-transformer": TinyTransformer, "seq-lstm": TinyLSTM}


def sequence_family(name: str, device: str = "cpu") -> ModuleFamily:
    """``seq-transformer`` or ``seq-lstm``: minibatches of 32 sequences; scored on 1024 fixed ones."""
    return ModuleFamily(SEQUENCE_FAMILIES[name], markov_sequences(), next_token_loss, 32, name=name,
                        eval_examples=1024, device=device)


def resnet_family(data_dir: str | None = None, device: str = "cpu") -> ModuleFamily:
    data = _mnist(data_dir, str(device))
    return ModuleFamily(residual_cnn, (data.train_images, data.train_labels), nn.functional.cross_entropy, 64,
                        name="mnist-resnet-bn", eval_examples=2048, device=device)
