"""Matching networks (Vinyals et al. 2016) on the same engine as ProtoNet: an episode with zero inner steps.

A query is classified by attention over the support set: ``P(y | x, S) = sum_i a(x, x_i) y_i`` with
``a = softmax_i(s * cos(f(x), g(x_i)))``. The paper writes no scale ``s``; here it is learned (from 10), because
cosines lie in [-1, 1]: unscaled, a 5-way softmax can put at most ~0.65 on the right class, the attention stays
flat and training stalls (query NLL ~1.1 and ~89% 5-way 1-shot accuracy after 20k episodes, measured). Without
full-context embeddings (FCE), ``f = g`` is the Conv-4 embedding (the paper's Omniglot setting). With FCE, ``g``
adds a bidirectional LSTM over the support embeddings and ``f`` is an attention LSTM that reads the support set
for ``processing_steps`` steps (the paper's Appendix A.2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from learnedopt import UnrollResult
from learnedopt.unroll import Params

from .episodes import Episode, episode_unroll
from .models import conv4

__all__ = ["MatchingNetwork", "episode_loss", "episode_accuracy"]


class MatchingNetwork(nn.Module):
    """The embedding and (``fce=True``) the full-context encoders; :meth:`forward` gives log-probabilities.

    Example:
        >>> net = MatchingNetwork(channels=8, fce=True)
        >>> support, labels = torch.randn(5, 1, 28, 28), torch.arange(5)
        >>> log_p = net(support, labels, torch.randn(3, 1, 28, 28))
        >>> log_p.shape, bool(torch.allclose(log_p.exp().sum(-1), torch.ones(3)))
        (torch.Size([3, 5]), True)
    """

    def __init__(self, channels: int = 64, fce: bool = False, processing_steps: int = 5) -> None:
        super().__init__()
        self.embed = conv4(None, channels)
        self.fce, self.processing_steps = fce, processing_steps
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # the attention's inverse temperature
        if fce:
            self.support_lstm = nn.LSTM(channels, channels, bidirectional=True, batch_first=True)
            self.query_cell = nn.LSTMCell(channels, 2 * channels)  # its hidden state is [h, r] (Appendix A.2)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Log-probabilities ``(queries, ways)`` of each query's class."""
        ways = int(support_y.max()) + 1
        both = self.embed(torch.cat((support_x, query_x)))
        support, query = both[: len(support_y)], both[len(support_y) :]
        if self.fce:
            support, query = self._contextual(support, query)
        similarity = nn.functional.normalize(query, dim=-1) @ nn.functional.normalize(support, dim=-1).t()
        attention = (self.log_scale.exp() * similarity).softmax(dim=-1)  # (queries, support)
        probabilities = attention @ nn.functional.one_hot(support_y, ways).to(attention.dtype)
        return probabilities.clamp_min(1e-12).log()

    def _contextual(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """``g(x_i, S) = g'(x_i) + h_fwd_i + h_bwd_i``, and the attention LSTM's ``f(x, S)``."""
        width = support.shape[1]
        both_ways, _ = self.support_lstm(support.unsqueeze(0))
        g = support + both_ways[0, :, :width] + both_ways[0, :, width:]
        h = query
        c = query.new_zeros(len(query), 2 * width)
        readout = query.new_zeros(len(query), width)
        for _ in range(self.processing_steps):
            hidden, c = self.query_cell(query, (torch.cat((h, readout), dim=1), c))
            h = hidden[:, :width] + query
            readout = (h @ g.t()).softmax(dim=-1) @ g
        return g, h


def _log_probabilities(model: nn.Module, params: Params, episode: Episode) -> Tensor:
    return torch.func.functional_call(model, params, (episode.support_x, episode.support_y, episode.query_x))


def episode_loss(model: nn.Module, params: Params, episode: Episode) -> UnrollResult:
    """The query set's negative log-likelihood; ``.meta_loss`` carries the gradient."""

    def loss_fn(p: Params, ep: Episode) -> Tensor:
        return nn.functional.nll_loss(_log_probabilities(model, p, ep), ep.query_y)

    return episode_unroll(loss_fn, params, episode)


@torch.no_grad()
def episode_accuracy(model: nn.Module, episode: Episode) -> float:
    log_p = _log_probabilities(model, dict(model.named_parameters()), episode)
    return float((log_p.argmax(-1) == episode.query_y).float().mean())
