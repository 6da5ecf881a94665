"""The unroll engine: run an update rule on functional parameters, differentiably.

One loop serves LSTM meta-training (truncated unrolls, gradients detached as in Andrychowicz et al. 2016),
MAML (full second order, or first order by detaching) and ProtoNet episodes (zero inner steps). Parameters are a
``dict[str, Tensor]``, so any ``nn.Module`` is an optimizee through :func:`module_loss`.

Step ``t`` (``0 <= t < steps``) evaluates ``L_t = loss(theta_t, batch(t))``, takes its gradient and applies the
rule's update to get ``theta_{t+1}``; the engine then evaluates ``L_T = loss(theta_T, batch(T))``. The meta-loss
is ``sum_t w_t * mean(L_t)`` over those ``T + 1`` losses. A loss may be a vector (one entry per task of a batched
family): each entry's gradient is then that task's own, and the mean is taken over tasks.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .rules import RuleState, UpdateRule

__all__ = ["UnrollResult", "unroll", "module_loss", "default_weights"]

Params = dict[str, Tensor]
LossFn = Callable[[Params, Any], Tensor]


@dataclass
class UnrollResult:
    """What an unroll returns.

    Attributes:
        params: ``theta_T``, still attached to the graph when the unroll ran with gradients enabled.
        state: the rule's state after ``T`` updates (detach it to carry it into the next truncation).
        losses: ``(T + 1, *loss_shape)`` tensor of ``L_0 .. L_T``.
        meta_loss: the weighted sum of the (task-averaged) losses; differentiable w.r.t. the rule's parameters
            and the initial parameters when the unroll ran with gradients enabled.
    """

    params: Params
    state: RuleState
    losses: Tensor
    meta_loss: Tensor

    def detached(self) -> tuple[Params, RuleState]:
        """``(params, state)`` cut from the graph, ready to start the next truncation."""
        params = {k: v.detach() for k, v in self.params.items()}
        state = [{k: v.detach() for k, v in s.items()} for s in self.state]
        return params, state


def default_weights(steps: int) -> Tensor:
    """Weight 1 on every loss the rule's updates influence (``L_1 .. L_T``), 0 on ``L_0``."""
    weights = torch.ones(steps + 1)
    weights[0] = 0.0
    return weights


def unroll(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    rule: UpdateRule,
    state: RuleState | None,
    steps: int,
    batch: Callable[[int], Any],
    *,
    second_order: bool = False,
    weights: Tensor | Sequence[float] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    checkpoint: int = 0,
) -> UnrollResult:
    """Run ``steps`` updates of ``rule`` on ``params`` and return the final params, state, losses and meta-loss.

    Args:
        loss_fn: ``loss_fn(params, batch) -> Tensor`` (a scalar, or one loss per task).
        params: initial parameters. Those that require grad (e.g. MAML's meta-parameters) stay in the graph;
            the others are treated as fresh leaves.
        rule: any update rule; its own parameters (e.g. the LSTM's weights) receive meta-gradients. A rule whose
            ``takes_loss`` attribute is true also gets each step's loss, detached, as ``update(..., loss=L_t)``
            (Ravi & Larochelle's meta-learner reads it).
        state: the rule's state, or ``None`` for ``rule.init``.
        steps: number of updates ``T`` (0 is allowed: a single evaluation, as for ProtoNet).
        batch: ``batch(t)`` gives the batch for the loss at step ``t``, for ``t = 0 .. T``.
        second_order: keep the graph of the gradients (MAML). ``False`` treats each gradient as a constant
            input to the rule, as in Andrychowicz et al. (2016) and first-order MAML.
        weights: ``T + 1`` weights of ``L_0 .. L_T`` in the meta-loss; default :func:`default_weights`.
        transform: applied to each loss inside the meta-loss (e.g. ``torch.log`` to weigh relative progress).
        checkpoint: gradient checkpointing: store only the parameters and rule state at the start of every
            segment of ``checkpoint`` steps and recompute the segment's inside during backward (its memory and
            time: results/performance.md). 0 (default) stores everything.

    With gradients disabled (``torch.no_grad()``) the engine evaluates a rule cheaply: each step's parameters
    are cut from the graph, and nothing is kept for a meta-gradient.

    Example:
        >>> import torch, learnedopt
        >>> loss = lambda p, _: (p["x"] ** 2).sum()
        >>> out = learnedopt.unroll(loss, {"x": torch.ones(3)}, learnedopt.sgd(0.25), None, 2, lambda t: None)
        >>> out.losses.detach()
        tensor([3.0000, 0.7500, 0.1875])
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    w = default_weights(steps) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (steps + 1,):
        raise ValueError(f"weights must have {steps + 1} entries (L_0 .. L_T), got shape {tuple(w.shape)}")
    track = torch.is_grad_enabled()
    if checkpoint < 0:
        raise ValueError(f"checkpoint must be >= 0 (0: store every step), got {checkpoint}")
    names = list(params)
    theta = [p if p.requires_grad else p.detach().requires_grad_() for p in params.values()]
    if state is None:
        state = rule.init(theta)

    def run_steps(first: int, last: int, theta: list[Tensor], state: RuleState
                  ) -> tuple[list[Tensor], list[Tensor], RuleState]:
        """Updates ``first .. last - 1``: their losses ``L_first ..``, then the parameters and state after them."""
        losses = []
        for t in range(first, last):
            # Under checkpointing, the loss's own graph is stored as usual: the gradient taken right below would
            # otherwise make the checkpoint recompute the segment so far at every step.
            keep = torch.autograd.graph.saved_tensors_hooks(_identity, _identity) if checkpoint else nullcontext()
            with torch.enable_grad(), keep:
                if not track:
                    theta = [p.detach().requires_grad_() for p in theta]
                loss = loss_fn(dict(zip(names, theta)), batch(t))
                raw = torch.autograd.grad(
                    loss.sum(), theta, create_graph=track and second_order, retain_graph=track, allow_unused=True
                )
            losses.append(loss if track else loss.detach())
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(theta, raw)]
            if not second_order:
                grads = [g.detach() for g in grads]
            given: dict[str, Any] = {"loss": loss.detach()} if getattr(rule, "takes_loss", False) else {}
            updates, state = rule.update(grads, state, theta, **given)
            theta = [p + u for p, u in zip(theta, updates)]
        return losses, theta, state

    losses: list[Tensor] = []
    segment = checkpoint if checkpoint and track else max(steps, 1)
    for first in range(0, steps, segment):
        last = min(first + segment, steps)
        if checkpoint and track:  # keep only the segment's inputs; recompute its inside during backward
            part, theta, state = torch.utils.checkpoint.checkpoint(
                run_steps, first, last, theta, state, use_reentrant=False
            )
        else:
            part, theta, state = run_steps(first, last, theta, state)
        losses.extend(part)
    with torch.enable_grad() if track else torch.no_grad():
        final = loss_fn(dict(zip(names, theta)), batch(steps))
    losses.append(final)
    stacked = torch.stack(losses)
    per_step = stacked if transform is None else transform(stacked)
    per_step = per_step.reshape(steps + 1, -1).mean(dim=1)
    meta_loss = (w.to(per_step.device, per_step.dtype) * per_step).sum()
    return UnrollResult(dict(zip(names, theta)), state, stacked, meta_loss)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def module_loss(module: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor]) -> LossFn:
    """Turn ``module`` into a functional ``loss_fn(params, (inputs, targets))`` for :func:`unroll`.

    Buffers (e.g. BatchNorm running stats) are taken from the module; parameters from ``params``.

    Example:
        >>> import torch, learnedopt
        >>> net = torch.nn.Linear(2, 1)
        >>> loss_fn = learnedopt.module_loss(net, torch.nn.functional.mse_loss)
        >>> params = dict(net.named_parameters())
        >>> x, y = torch.randn(4, 2), torch.randn(4, 1)
        >>> bool(loss_fn(params, (x, y)) == torch.nn.functional.mse_loss(net(x), y))
        True
    """

    def loss_fn(params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        outputs = torch.func.functional_call(module, params, (inputs,))
        return criterion(outputs, targets)

    return loss_fn
