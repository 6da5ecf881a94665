"""Meta-gradient estimators: ES and PES are unbiased where they should be, TBPTT is biased across truncations."""

import math

import pytest
import torch

from learnedopt import AntitheticES, PersistentES, TruncatedBackprop

A = torch.tensor([[1.0, 0.3], [0.3, 0.2]], dtype=torch.float64)


class PreconditionedSGD:
    """A rule with three meta-parameters: ``update = -exp(log_lr) * scale * grad``."""

    def __init__(self) -> None:
        self.log_lr = torch.tensor(math.log(0.3), dtype=torch.float64, requires_grad=True)
        self.scale = torch.tensor([1.0, 1.5], dtype=torch.float64, requires_grad=True)
        self.meta_params = [self.log_lr, self.scale]

    def init(self, params):
        return [{} for _ in params]

    def update(self, grads, state, params):
        return [-torch.exp(self.log_lr) * self.scale * g for g in grads], state


def quadratic(params, _batch):
    x = params["x"]
    return 0.5 * x @ A @ x


def start():
    return {"x": torch.tensor([2.0, -1.0], dtype=torch.float64)}


def run_horizon(estimator, rule, truncations, steps, generator=None):
    """The sum of the estimator's truncation gradients over one inner problem, flattened."""
    carry = estimator.start(start())
    total = torch.zeros(3, dtype=torch.float64)
    for _ in range(truncations):
        grads, _, carry = estimator.estimate(rule.meta_params, rule, quadratic, carry, steps, lambda t: None,
                                             generator=generator)
        total += torch.cat([g.reshape(-1) for g in grads])
    return total


def exact_gradient(rule, horizon):
    """The true meta-gradient of the whole inner problem: backprop through one truncation of full length."""
    return run_horizon(TruncatedBackprop(second_order=True), rule, 1, horizon)


def sample_mean_and_error(estimator, rule, truncations, steps, repeats):
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([run_horizon(estimator, rule, truncations, steps, g) for _ in range(repeats)])
    return samples.mean(0), samples.std(0) / math.sqrt(repeats)


@pytest.mark.parametrize("estimator", [AntitheticES(pairs=20, sigma=1e-3), PersistentES(pairs=20, sigma=1e-3)])
def test_es_estimates_one_truncation_without_bias(estimator):
    rule = PreconditionedSGD()
    true = exact_gradient(rule, 6)
    mean, error = sample_mean_and_error(estimator, rule, 1, 6, repeats=30)
    assert (error > 0).all()
    assert ((mean - true).abs() <= 4 * error + 1e-9).all(), (mean, true, error)


def test_pes_is_unbiased_across_truncations_where_tbptt_is_not():
    """Vicol et al. (2021), Figure 1's point: 10 truncations of 2 steps, the whole-horizon gradient."""
    rule = PreconditionedSGD()
    true = exact_gradient(rule, 20)
    tbptt = run_horizon(TruncatedBackprop(second_order=True), rule, 10, 2)  # exact within each truncation
    mean, error = sample_mean_and_error(PersistentES(pairs=25, sigma=1e-3), rule, 10, 2, repeats=30)
    assert ((mean - true).abs() <= 4 * error + 1e-9).all(), (mean, true, error)
    bias = (tbptt - true).abs()  # TBPTT is deterministic here: its error is all bias
    assert (bias > 4 * error).any() and bias.max() > 0.3 * true.abs().max(), (tbptt, true, error)


def test_es_restores_the_meta_parameters_exactly():
    rule = PreconditionedSGD()
    before = [p.detach().clone() for p in rule.meta_params]
    run_horizon(PersistentES(pairs=3, sigma=0.1), rule, 3, 2, torch.Generator().manual_seed(1))
    for p, q in zip(rule.meta_params, before):
        assert torch.equal(p.detach(), q)


def test_bad_estimator_arguments():
    with pytest.raises(ValueError, match="sigma"):
        AntitheticES(pairs=4, sigma=0.0)
    with pytest.raises(ValueError, match="pairs"):
        PersistentES(pairs=0)


@pytest.mark.parametrize("estimator", [AntitheticES(pairs=2, sigma=0.1), PersistentES(pairs=2, sigma=0.1)])
def test_es_never_writes_the_live_meta_parameters(estimator):
    """Perturbed truncations run on a private copy of the rule: the live weights keep their value throughout
    (another thread, an evaluation, or an exception mid-unroll never sees perturbed weights)."""
    rule = PreconditionedSGD()
    original = [p.detach().clone() for p in rule.meta_params]
    seen = []

    def watched(params, batch):
        seen.append(all(torch.equal(p, o) for p, o in zip(rule.meta_params, original)))
        return quadratic(params, batch)

    grads, _, _ = estimator.estimate(rule.meta_params, rule, watched, estimator.start(start()), 3, lambda t: None,
                                     generator=torch.Generator().manual_seed(0))
    assert len(seen) > 8 and all(seen)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
