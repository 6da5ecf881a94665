"""Meta-gradient estimators for truncated unrolls: truncated backprop, antithetic ES, and persistent ES.

Meta-training splits a long inner optimization into truncations of ``steps`` updates. An estimator turns one
truncation into a gradient for the rule's meta-parameters (e.g. the LSTM's weights) and carries whatever it needs
into the next truncation of the same inner problem:

- :class:`TruncatedBackprop` back-propagates through the truncation (Andrychowicz et al. 2016). Cheap and low
  variance, but *biased*: it ignores how the meta-parameters shaped the state the truncation started from.
- :class:`AntitheticES` estimates the gradient of the Gaussian-smoothed truncation loss from ``2 * pairs``
  no-grad unrolls at ``theta +- sigma * eps``; no backprop, so memory does not grow with ``steps``. Biased across
  truncations like TBPTT.
- :class:`PersistentES` (Vicol et al., "Unbiased Gradient Estimation in Unrolled Computation Graphs with
  Persistent Evolution Strategies", ICML 2021): each perturbed particle keeps its own inner state across
  truncations and accumulates its perturbations, which makes the sum of the truncations' estimates an unbiased
  estimate of the smoothed gradient of the *whole* inner problem.

Every estimator's :meth:`~GradientEstimator.estimate` returns ``(grads, meta_loss, carry)``: one gradient per
meta-parameter, the truncation's meta-loss as a float, and the carry for the next truncation; ``start`` makes the
carry of a fresh inner problem. Noise comes from the caller's ``torch.Generator``, so runs are reproducible.

Example:
    >>> import torch, learnedopt
    >>> net = learnedopt.CoordinatewiseLSTM()
    >>> rule = learnedopt.LSTMRule(net)
    >>> loss = lambda p, _: (p["x"] ** 2).sum()
    >>> estimator = learnedopt.PersistentES(pairs=2, sigma=0.01)
    >>> carry = estimator.start({"x": torch.ones(3)})
    >>> g = torch.Generator().manual_seed(0)
    >>> grads, meta_loss, carry = estimator.estimate(list(net.parameters()), rule, loss, carry, 5, lambda t: None,
    ...                                              generator=g)
    >>> [x.shape for x in grads] == [p.shape for p in net.parameters()]
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from ..rules import RuleState, UpdateRule
from ..unroll import LossFn, Params, unroll

__all__ = ["GradientEstimator", "TruncatedBackprop", "AntitheticES", "PersistentES", "ESTIMATORS"]

Batch = Callable[[int], Any]


@dataclass
class Trajectory:
    """Where one inner optimization stands: its parameters and the rule's state."""

    params: Params
    state: RuleState | None = None


@dataclass
class PESCarry:
    """The antithetic particles of :class:`PersistentES` and each pair's accumulated perturbation."""

    plus: list[Trajectory]
    minus: list[Trajectory]
    reference: Trajectory  # the unperturbed trajectory, for reporting its meta-loss
    accumulated: Tensor | None = None  # (pairs, number of meta-parameters); None before the first truncation


class GradientEstimator(Protocol):
    """Turns one truncation of an inner optimization into a meta-gradient."""

    def start(self, params: Mapping[str, Tensor]) -> Any:
        """The carry of a fresh inner problem whose initial parameters are ``params``."""
        ...

    def estimate(
        self,
        meta_params: Sequence[Tensor],
        rule: UpdateRule,
        loss_fn: LossFn,
        carry: Any,
        steps: int,
        batch: Batch,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[Tensor], float, Any]:
        """Gradients for ``meta_params`` (which ``rule`` reads), the meta-loss, and the next carry."""
        ...


class TruncatedBackprop:
    """Backprop through the truncation; the next one starts from its detached end (the default, ``tbptt``).

    ``second_order=False`` treats the optimizee's gradients as inputs, as Andrychowicz et al. (2016) do (cheaper;
    drops the Hessian terms); ``True`` gives the exact gradient of the truncation's meta-loss. ``checkpoint=k``
    recomputes segments of ``k`` steps in the backward pass instead of storing them (see :func:`unroll`).
    """

    def __init__(self, second_order: bool = False, checkpoint: int = 0) -> None:
        self.second_order, self.checkpoint = second_order, checkpoint

    def start(self, params: Mapping[str, Tensor]) -> Trajectory:
        return Trajectory(dict(params))

    def estimate(
        self,
        meta_params: Sequence[Tensor],
        rule: UpdateRule,
        loss_fn: LossFn,
        carry: Trajectory,
        steps: int,
        batch: Batch,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[Tensor], float, Trajectory]:
        out = unroll(loss_fn, carry.params, rule, carry.state, steps, batch, second_order=self.second_order,
                     transform=transform, checkpoint=self.checkpoint)
        raw = torch.autograd.grad(out.meta_loss, list(meta_params), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(meta_params, raw)]
        params, state = out.detached()
        return grads, out.meta_loss.item(), Trajectory(params, state)


def _unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for p in like:
        out.append(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


class _Perturbed:
    """Evaluate a truncation at meta-parameters ``theta + delta`` (no autograd) on a private copy of the rule
    whose parameters stand in for ``meta_params``: the live weights are never written."""

    def __init__(self, meta_params: Sequence[Tensor], rule: UpdateRule, loss_fn: LossFn, steps: int, batch: Batch,
                 transform: Callable[[Tensor], Tensor] | None) -> None:
        self.theta = parameters_to_vector(list(meta_params)).detach()
        self.stand_ins = [torch.nn.Parameter(p.detach().clone(), requires_grad=False) for p in meta_params]
        self.rule = copy.deepcopy(rule, {id(p): q for p, q in zip(meta_params, self.stand_ins)})
        self.loss_fn, self.steps, self.batch, self.transform = loss_fn, steps, batch, transform

    def __call__(self, delta: Tensor | None, start: Trajectory) -> tuple[float, Trajectory]:
        with torch.no_grad():
            weights = self.theta if delta is None else self.theta + delta
            for q, w in zip(self.stand_ins, _unflatten(weights, self.stand_ins)):
                q.copy_(w)
            out = unroll(self.loss_fn, start.params, self.rule, start.state, self.steps, self.batch,
                         transform=self.transform)
        params, state = out.detached()
        return out.meta_loss.item(), Trajectory(params, state)


class _EvolutionStrategy:
    """What antithetic and persistent ES share: ``pairs`` antithetic perturbations of standard deviation
    ``sigma`` per truncation, and an inner problem that starts from detached parameters."""

    def __init__(self, pairs: int = 8, sigma: float = 0.01) -> None:
        if pairs < 1 or not sigma > 0:
            raise ValueError(f"{type(self).__name__} needs pairs >= 1 and sigma > 0, got pairs={pairs}, sigma={sigma}")
        self.pairs, self.sigma = pairs, sigma

    @staticmethod
    def _trajectory(params: Mapping[str, Tensor]) -> Trajectory:
        return Trajectory({k: v.detach() for k, v in params.items()})


class AntitheticES(_EvolutionStrategy):
    """Antithetic evolution strategies on one truncation: ``g = sum_i (L(theta + e_i) - L(theta - e_i)) e_i /
    (2 pairs sigma^2)`` with ``e_i ~ N(0, sigma^2 I)``. The carry follows the unperturbed meta-parameters."""

    def start(self, params: Mapping[str, Tensor]) -> Trajectory:
        return self._trajectory(params)

    def estimate(
        self,
        meta_params: Sequence[Tensor],
        rule: UpdateRule,
        loss_fn: LossFn,
        carry: Trajectory,
        steps: int,
        batch: Batch,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[Tensor], float, Trajectory]:
        run = _Perturbed(meta_params, rule, loss_fn, steps, batch, transform)
        noise = _noise(self.pairs, run.theta, self.sigma, generator)
        grad = torch.zeros_like(run.theta)
        for eps in noise:
            plus, _ = run(eps, carry)
            minus, _ = run(-eps, carry)
            grad += (plus - minus) * eps
        grad /= 2 * self.pairs * self.sigma**2
        meta_loss, carry = run(None, carry)
        return _unflatten(grad, meta_params), meta_loss, carry


class PersistentES(_EvolutionStrategy):
    """Persistent evolution strategies (Vicol et al. 2021): unbiased across truncations.

    Particle pair ``i`` runs the inner problem at ``theta + e_i`` and ``theta - e_i``, with fresh ``e_i`` every
    truncation, keeping each particle's own parameters and rule state; ``xi_i`` sums pair ``i``'s perturbations
    since the inner problem started. Estimate: ``sum_i xi_i (L_i^+ - L_i^-) / (2 pairs sigma^2)``.
    The reported meta-loss is that of an unperturbed trajectory run alongside.
    """

    def start(self, params: Mapping[str, Tensor]) -> PESCarry:
        start = self._trajectory(params)
        return PESCarry([start] * self.pairs, [start] * self.pairs, start)

    def estimate(
        self,
        meta_params: Sequence[Tensor],
        rule: UpdateRule,
        loss_fn: LossFn,
        carry: PESCarry,
        steps: int,
        batch: Batch,
        *,
        transform: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[Tensor], float, PESCarry]:
        run = _Perturbed(meta_params, rule, loss_fn, steps, batch, transform)
        noise = _noise(self.pairs, run.theta, self.sigma, generator)
        accumulated = noise if carry.accumulated is None else carry.accumulated + noise
        grad = torch.zeros_like(run.theta)
        plus, minus = [], []
        for i, eps in enumerate(noise):
            loss_plus, trajectory_plus = run(eps, carry.plus[i])
            loss_minus, trajectory_minus = run(-eps, carry.minus[i])
            plus.append(trajectory_plus)
            minus.append(trajectory_minus)
            grad += (loss_plus - loss_minus) * accumulated[i]
        grad /= 2 * self.pairs * self.sigma**2
        meta_loss, reference = run(None, carry.reference)
        return _unflatten(grad, meta_params), meta_loss, PESCarry(plus, minus, reference, accumulated)


def _noise(pairs: int, theta: Tensor, sigma: float, generator: torch.Generator | None) -> Tensor:
    """``(pairs, D)`` Gaussian perturbations, drawn on the CPU from ``generator`` so runs are reproducible."""
    eps = torch.randn(pairs, theta.numel(), generator=generator, dtype=theta.dtype)
    return (eps * sigma).to(theta.device)


ESTIMATORS: dict[str, type[TruncatedBackprop] | type[AntitheticES] | type[PersistentES]] = {
    "tbptt": TruncatedBackprop,
    "es": AntitheticES,
    "pes": PersistentES,
}
