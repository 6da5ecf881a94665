"""Few-shot data: N-way K-shot Omniglot episodes and sinusoid regression tasks, sampled with a generator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from learnedopt import UnrollResult, sgd, unroll
from learnedopt.unroll import Params

from .omniglot import Omniglot

__all__ = ["Episode", "EpisodeSampler", "sample_sinusoids", "episode_unroll"]


@dataclass
class Episode:
    """One task: a labelled support set to adapt on and a query set to score; labels are 0..N-1."""

    support_x: Tensor  # (N*K, 1, 28, 28) for images, (K, 1) for sinusoids
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


def episode_unroll(loss_fn: Callable[[Params, "Episode"], Tensor], params: Params, episode: "Episode") -> UnrollResult:
    """An episode of a method without an inner loop (ProtoNet, matching networks) as the unroll engine with zero
    inner steps: ``.meta_loss`` is ``loss_fn(params, episode)``, carrying the gradient."""
    return unroll(loss_fn, params, sgd(0.0), None, 0, lambda t: episode, weights=[1.0])


class EpisodeSampler:
    """N-way K-shot episodes from one split's classes (a character at one rotation is a class).

    Example:
        >>> from .omniglot import load_omniglot
        >>> sampler = EpisodeSampler(load_omniglot(), "train", ways=5, shots=1, queries=15)
        >>> sampler.sample(torch.Generator().manual_seed(0)).query_x.shape
        torch.Size([75, 1, 28, 28])
    """

    def __init__(self, data: Omniglot, split: str, ways: int, shots: int, queries: int) -> None:
        if shots + queries > data.images.shape[1]:
            raise ValueError(f"shots + queries = {shots + queries} exceeds the {data.images.shape[1]} drawings per class")
        self.images, self.classes = data.images, data.split(split)
        if ways > len(self.classes):
            raise ValueError(f"{ways}-way episodes need at least {ways} classes; split {split!r} has {len(self.classes)}")
        self.ways, self.shots, self.queries = ways, shots, queries

    def sample(self, generator: torch.Generator) -> Episode:
        picked = torch.randperm(len(self.classes), generator=generator)[: self.ways].tolist()
        support, query = [], []
        for cls in picked:
            character, rotation = self.classes[cls]
            drawings = torch.randperm(self.images.shape[1], generator=generator)[: self.shots + self.queries]
            images = torch.rot90(self.images[character, drawings], rotation, dims=(-2, -1)).unsqueeze(1)
            support.append(images[: self.shots])
            query.append(images[self.shots :])
        labels = torch.arange(self.ways)
        return Episode(
            torch.cat(support), labels.repeat_interleave(self.shots), torch.cat(query), labels.repeat_interleave(self.queries)
        )


def sample_sinusoids(shots: int, queries: int, generator: torch.Generator) -> Episode:
    """Finn et al. (2017) Section 5.1: amplitude U[0.1, 5], phase U[0, pi], inputs U[-5, 5]."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=generator)
    phase = math.pi * torch.rand((), generator=generator)
    x = 10 * torch.rand(shots + queries, 1, generator=generator) - 5
    y = amplitude * torch.sin(x - phase)
    return Episode(x[:shots], y[:shots], x[shots:], y[shots:])
