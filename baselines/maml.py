"""MAML and first-order MAML (Finn et al. 2017) as a thin layer over :func:`learnedopt.unroll`.

A meta-batch runs either as a loop over tasks or, for Conv-4, as one unroll of a task-batched network
(:mod:`learnedopt_experiments.baselines.batched`; grouped convolutions, not ``vmap``, which is wrong for second order through BatchNorm).

The inner loop is the unroll engine with an update rule (plain SGD by default; any rule, the learned LSTM
included, works) on the support set, followed by one evaluation on the query set: ``weights = [0, ..., 0, 1]``
puts the whole meta-loss on the query loss at the adapted parameters. Second order keeps each inner gradient's
graph; first order detaches it, so the meta-gradient is the query gradient at the adapted parameters.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from learnedopt import UnrollResult, UpdateRule, module_loss, sgd, unroll

from .batched import task_batched_loss
from .episodes import Episode

__all__ = ["adapt", "adapt_batched", "maml_step", "query_accuracy"]


def _rule(inner: float | UpdateRule) -> UpdateRule:
    """The inner loop's rule: SGD at ``inner`` if it is a learning rate."""
    return sgd(float(inner)) if isinstance(inner, (int, float)) else inner

def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    episode: Episode,
    steps: int,
    inner: float | UpdateRule,
    criterion: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    first_order: bool = False,
) -> UnrollResult:
    """``steps`` inner updates on the support set; ``meta_loss`` is the query loss at the adapted parameters.

    ``inner`` is the inner loop's SGD learning rate, or any update rule (the learned LSTM rule, ...).

    Example:
        >>> from learnedopt_experiments.baselines.models import sinusoid_mlp
        >>> from learnedopt_experiments.baselines.episodes import sample_sinusoids
        >>> model = sinusoid_mlp()
        >>> episode = sample_sinusoids(10, 10, torch.Generator().manual_seed(0))
        >>> out = adapt(model, dict(model.named_parameters()), episode, 1, 0.01, nn.functional.mse_loss)
        >>> out.meta_loss.backward()  # second-order meta-gradient into model's parameters
    """

    def batch(t: int) -> tuple[Tensor, Tensor]:
        if t < steps:
            return episode.support_x, episode.support_y
        return episode.query_x, episode.query_y

    weights = torch.zeros(steps + 1)
    weights[-1] = 1.0
    return unroll(
        module_loss(model, criterion), params, _rule(inner), None, steps, batch,
        second_order=not first_order, weights=weights,
    )


def maml_step(
    model: nn.Module,
    meta_opt: torch.optim.Optimizer,
    episodes: list[Episode],
    steps: int,
    inner: float | UpdateRule,
    criterion: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    first_order: bool = False,
    batched: bool = False,
) -> float:
    """One meta-update on a meta-batch of episodes; returns the mean query loss.

    ``batched=False`` adapts task by task (any model and criterion). ``batched=True`` (Conv-4 classifiers, all
    episodes of one shape) runs the whole meta-batch as one unroll of a task-batched network
    (:mod:`learnedopt_experiments.baselines.batched`): the same meta-gradient, in less time on a CPU
    (``benchmarks/maml_cost.py``). ``inner`` is SGD's learning rate or an update rule; when the rule's own weights
    are in ``meta_opt`` (the learned LSTM rule), they are meta-trained together with the initialization.
    """
    meta_opt.zero_grad()
    params = dict(model.named_parameters())
    if batched:
        out = adapt_batched(model, params, episodes, steps, inner, first_order)
        out.meta_loss.backward()
        meta_opt.step()
        return out.meta_loss.item()
    total = 0.0
    for episode in episodes:
        out = adapt(model, params, episode, steps, inner, criterion, first_order)
        (out.meta_loss / len(episodes)).backward()
        total += out.meta_loss.item()
    meta_opt.step()
    return total / len(episodes)


def adapt_batched(
    model: nn.Module,
    params: Mapping[str, Tensor],
    episodes: list[Episode],
    steps: int,
    inner: float | UpdateRule,
    first_order: bool = False,
) -> UnrollResult:
    """:func:`adapt` for a whole meta-batch at once: every task starts from ``params``, adapts on its own support
    set, and ``meta_loss`` is the mean query cross-entropy over tasks."""
    loss_fn = task_batched_loss(model)  # refuses models it cannot widen, before any episode is touched
    tasks = len(episodes)
    support = torch.stack([e.support_x for e in episodes]), torch.stack([e.support_y for e in episodes])
    query = torch.stack([e.query_x for e in episodes]), torch.stack([e.query_y for e in episodes])
    weights = torch.zeros(steps + 1)
    weights[-1] = 1.0
    return unroll(
        loss_fn, {k: v.expand(tasks, *v.shape) for k, v in params.items()},
        _rule(inner), None, steps, lambda t: support if t < steps else query,
        second_order=not first_order, weights=weights,
    )


def query_accuracy(
    model: nn.Module, episode: Episode, steps: int, inner: float | UpdateRule, query_batch: int | None = None,
) -> float:
    """Adapt on the support set without building a meta-graph, then classify the query set.

    ``query_batch`` sets how many query images go through the network at once, which matters with BatchNorm on
    batch statistics: ``None`` classifies all of them together; Finn et al.'s code classifies N·K at a time. Each
    batch mixes the classes (one image of each class in turn), as a shuffled query set would: a batch of one
    class alone would have its class signal normalized away.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = episode.query_x, episode.query_y
    if query_batch is not None and y.dtype == torch.int64:
        ways = int(y.max()) + 1
        order = torch.argsort(y, stable=True).view(ways, -1).t().reshape(-1)  # class 0, 1, …, N-1, 0, 1, …
        x, y = x[order], y[order]
    with torch.no_grad():
        adapted = adapt(model, params, episode, steps, inner, first_order=True).params
        size = query_batch or len(x)
        logits = torch.cat([
            torch.func.functional_call(model, adapted, (x[i : i + size],)) for i in range(0, len(x), size)
        ])
    return float((logits.argmax(-1) == y).float().mean())
