"""Update rules: pure ``init`` / ``update`` pairs on tensors.

An update rule is the one place where an optimizer's math lives. By default it never mutates its inputs, so the
same rule runs differentiably inside the unroll engine (:func:`learnedopt.unroll`), where meta-gradients flow
through its updates and state, and under ``torch.no_grad`` in :class:`learnedopt.RuleOptimizer`, which passes
``inplace=True``: the caller gives up the old state, and a rule may write the new one into its tensors.

A rule's state is a list with one ``dict[str, Tensor]`` per parameter: exactly what ``torch.optim`` keeps in
``optimizer.state[p]``, so ``state_dict()`` works without any glue.

Example:
    >>> import torch, learnedopt
    >>> rule = learnedopt.adam(lr=0.1)
    >>> params = [torch.zeros(3)]
    >>> state = rule.init(params)
    >>> updates, state = rule.update([torch.ones(3)], state, params)
    >>> updates[0]
    tensor([-0.1000, -0.1000, -0.1000])
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

ParamState = dict[str, Tensor]
RuleState = list[ParamState]

__all__ = ["ParamState", "RuleState", "UpdateRule", "sgd", "adam", "rmsprop", "SGD", "Adam", "RMSprop", "check_lr"]


@runtime_checkable
class UpdateRule(Protocol):
    """What every optimizer in learnedopt is: a pure function of gradients, state and parameters."""

    def init(self, params: Sequence[Tensor]) -> RuleState:
        """Return the initial state, one dict per parameter."""
        ...

    def update(
        self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor], *, inplace: bool = False
    ) -> tuple[list[Tensor], RuleState]:
        """Return the additive updates (``new_param = param + update``) and the new state.

        ``inplace=True`` allows reusing ``state``'s tensors for the new state (the caller no longer needs the
        old one); a rule may ignore it. With ``inplace=False`` the inputs are never modified.
        """
        ...


def check_lr(lr: float | Tensor) -> None:
    """Refuse a learning rate that is not a finite number >= 0 (a 1-element tensor counts as its number), the
    one rule for every rule and optimizer here."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr!r} (expected a finite number >= 0)")


class SGD:
    """Stochastic gradient descent with optional (Nesterov) momentum, as in ``torch.optim.SGD``."""

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False) -> None:
        check_lr(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r} (expected 0 <= momentum < 1)")
        if nesterov and momentum == 0.0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov

    def init(self, params: Sequence[Tensor]) -> RuleState:
        if self.momentum == 0.0:
            return [{} for _ in params]
        return [{"momentum_buffer": torch.zeros_like(p)} for p in params]

    def update(
        self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor], *, inplace: bool = False
    ) -> tuple[list[Tensor], RuleState]:
        if self.momentum == 0.0:
            return [-self.lr * g for g in grads], [{} for _ in grads]
        updates, new_state = [], []
        for g, s in zip(grads, state):
            buf = self.momentum * s["momentum_buffer"] + g
            direction = g + self.momentum * buf if self.nesterov else buf
            updates.append(-self.lr * direction)
            new_state.append({"momentum_buffer": buf})
        return updates, new_state


class Adam:
    """Adam (Kingma & Ba 2015) with bias correction, numerically as ``torch.optim.Adam``."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        check_lr(lr)
        self.lr, self.betas, self.eps = lr, betas, eps

    def init(self, params: Sequence[Tensor]) -> RuleState:
        return [
            {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
            for p in params
        ]

    def update(
        self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor], *, inplace: bool = False
    ) -> tuple[list[Tensor], RuleState]:
        beta1, beta2 = self.betas
        updates, new_state = [], []
        for g, s in zip(grads, state):
            step = torch.as_tensor(s["step"], dtype=torch.float32) + 1  # torch.optim.Adam before 1.12 saved a number
            m = beta1 * s["exp_avg"] + (1 - beta1) * g
            v = beta2 * s["exp_avg_sq"] + (1 - beta2) * g * g
            # bias corrections in float64, as torch.optim.Adam's Python floats, without a host sync
            bias1 = 1 - beta1 ** step.double()
            bias2 = 1 - beta2 ** step.double()
            denom = v.sqrt() / bias2.sqrt() + self.eps
            updates.append(-(self.lr / bias1) * m / denom)
            new_state.append({"step": step, "exp_avg": m, "exp_avg_sq": v})
        return updates, new_state


class RMSprop:
    """RMSprop without momentum or centering, as ``torch.optim.RMSprop`` defaults."""

    def __init__(self, lr: float, alpha: float = 0.99, eps: float = 1e-8) -> None:
        check_lr(lr)
        self.lr, self.alpha, self.eps = lr, alpha, eps

    def init(self, params: Sequence[Tensor]) -> RuleState:
        return [{"square_avg": torch.zeros_like(p)} for p in params]

    def update(
        self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor], *, inplace: bool = False
    ) -> tuple[list[Tensor], RuleState]:
        updates, new_state = [], []
        for g, s in zip(grads, state):
            sq = self.alpha * s["square_avg"] + (1 - self.alpha) * g * g
            updates.append(-self.lr * g / (sq.sqrt() + self.eps))
            new_state.append({"square_avg": sq})
        return updates, new_state


def sgd(lr: float, momentum: float = 0.0, nesterov: bool = False) -> SGD:
    """SGD as an update rule; ``momentum=0.9, nesterov=True`` is NAG."""
    return SGD(lr, momentum, nesterov)


def adam(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Adam:
    """Adam as an update rule."""
    return Adam(lr, betas, eps)


def rmsprop(lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8) -> RMSprop:
    """RMSprop as an update rule."""
    return RMSprop(lr, alpha, eps)
