"""Prototypical networks (Snell et al. 2017): an episode is the unroll engine with zero inner steps.

Class prototypes are the mean support embeddings; a query's logits are negative squared Euclidean distances.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from learnedopt import UnrollResult
from learnedopt.unroll import Params

from .episodes import Episode, episode_unroll

__all__ = ["prototype_logits", "episode_loss", "episode_accuracy"]



def prototype_logits(support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
    """``-||q - c_k||^2`` for every query embedding ``q`` and class prototype ``c_k``."""
    prototypes = torch.zeros(ways, support.shape[1], dtype=support.dtype, device=support.device)
    prototypes.index_add_(0, support_y, support)
    prototypes = prototypes / torch.bincount(support_y, minlength=ways).unsqueeze(1).to(support.dtype)
    return -torch.cdist(query, prototypes).pow(2)


def _logits(embed: nn.Module, params: Params, episode: Episode) -> Tensor:
    ways = int(episode.support_y.max()) + 1
    both = torch.func.functional_call(embed, params, (torch.cat((episode.support_x, episode.query_x)),))
    support, query = both[: len(episode.support_y)], both[len(episode.support_y) :]
    return prototype_logits(support, episode.support_y, query, ways)


def episode_loss(embed: nn.Module, params: Params, episode: Episode) -> UnrollResult:
    """Cross-entropy of the query set against the prototypes; ``.meta_loss`` carries the gradient."""

    def loss_fn(p: Params, ep: Episode) -> Tensor:
        return nn.functional.cross_entropy(_logits(embed, p, ep), ep.query_y)

    return episode_unroll(loss_fn, params, episode)


@torch.no_grad()
def episode_accuracy(embed: nn.Module, episode: Episode) -> float:
    logits = _logits(embed, dict(embed.named_parameters()), episode)
    return float((logits.argmax(-1) == episode.query_y).float().mean())
