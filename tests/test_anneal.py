"""Annealing past the meta-training horizon (issue 20: the 10,000-step noise floor)."""

import math

import pytest
import torch

import learnedopt
from learnedopt import LearnedOptimizer, RuleOptimizer
from learnedopt.optimizer import ANNEAL_AFTER, anneal_factor


def test_anneal_factor_is_one_up_to_the_horizon_then_inverse_sqrt():
    assert [anneal_factor(t, 4) for t in (1, 4)] == [1.0, 1.0]
    assert anneal_factor(16, 4) == 0.5
    assert anneal_factor(10**6, None) == 1.0


def _fixed_gradient_steps(opt: torch.optim.Optimizer, w: torch.nn.Parameter, steps: range) -> list[torch.Tensor]:
    """The parameter's displacement at each step under a fixed gradient sequence (the same for every optimizer)."""
    moves = []
    for t in steps:
        w.grad = torch.linspace(-1.0, 1.0, w.numel()) * (1 + t % 3)
        before = w.detach().clone()
        opt.step()
        moves.append(w.detach() - before)
    return moves


def test_learned_steps_shrink_as_inverse_sqrt_after_the_horizon_and_survive_a_state_dict_round_trip():
    """Same gradients, same net: identical moves up to anneal_after, then exactly sqrt(T / t) of the raw net's."""
    raw_w, w = (torch.nn.Parameter(torch.zeros(8)) for _ in range(2))
    raw = _fixed_gradient_steps(LearnedOptimizer([raw_w], anneal_after=None), raw_w, range(6))
    opt = LearnedOptimizer([w], anneal_after=3)
    annealed = _fixed_gradient_steps(opt, w, range(4))
    assert opt.state[w]["steps_taken"].device.type == "cpu" and int(opt.state[w]["steps_taken"]) == 4
    resumed = LearnedOptimizer([w], anneal_after=3)
    resumed.load_state_dict(opt.state_dict())
    annealed += _fixed_gradient_steps(resumed, w, range(4, 6))
    for t, (a, r) in enumerate(zip(annealed, raw), start=1):
        assert r.abs().max() > 0
        torch.testing.assert_close(a, r * min(1.0, math.sqrt(3 / t)), rtol=1e-6, atol=1e-9)


def test_annealing_scales_weight_decay_and_is_per_param_group():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = RuleOptimizer([{"params": [a], "anneal_after": 1}, {"params": [b]}], learnedopt.sgd(lr=0.1),
                        weight_decay=0.5, decay_scale=0.1)
    for _ in range(4):
        a.grad, b.grad = torch.ones(3), torch.ones(3)
        opt.step()
    expected_a, expected_b = 1.0, 1.0
    for t in range(1, 5):
        lr = min(1.0, math.sqrt(1 / t))
        expected_a = expected_a * (1 - lr * 0.1 * 0.5) - lr * 0.1
        expected_b = expected_b * (1 - 0.1 * 0.5) - 0.1
    torch.testing.assert_close(a.detach(), torch.full((3,), expected_a))
    torch.testing.assert_close(b.detach(), torch.full((3,), expected_b))


def test_learned_optimizer_anneals_by_default_and_validates():
    w = torch.nn.Parameter(torch.zeros(2))
    assert LearnedOptimizer([w]).param_groups[0]["anneal_after"] == ANNEAL_AFTER
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="anneal_after"):
            LearnedOptimizer([w], anneal_after=bad)
        with pytest.raises(ValueError, match="anneal_after"):
            LearnedOptimizer([{"params": [w], "anneal_after": bad}])
