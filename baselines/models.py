"""The networks of the few-shot papers: Conv-4 (Vinyals et al.; Finn et al.; Snell et al.) and the sinusoid MLP."""

from __future__ import annotations

from torch import nn

__all__ = ["conv4", "sinusoid_mlp"]


def conv4(ways: int | None, channels: int = 64, strided: bool = False, in_channels: int = 1) -> nn.Sequential:
    """4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] (or stride-2 convolutions, MAML's Omniglot variant).

    ``ways=None`` gives the embedding alone (ProtoNet); otherwise a linear classifier over ``ways`` classes follows.
    BatchNorm always uses the batch's statistics (no running averages): that is what MAML's inner loop and a
    ProtoNet episode see, and it keeps the network a pure function of its parameters and inputs.
    """
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, stride=2 if strided else 1, padding=1),
            nn.BatchNorm2d(channels, track_running_stats=False),
            nn.ReLU(),
        ]
        if not strided:
            layers.append(nn.MaxPool2d(2))
    layers.append(nn.Flatten())
    if ways is not None:
        layers.append(nn.Linear(channels * 2 * 2 if strided else channels, ways))  # 28 -> 14 -> 7 -> 4 -> 2 / 1
    return nn.Sequential(*layers)


def sinusoid_mlp(hidden: int = 40) -> nn.Sequential:
    """1 -> 40 -> 40 -> 1 with ReLU (Finn et al. 2017, Section 5.1)."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
