"""The functional rules reproduce torch.optim (an independent implementation) step for step."""

import pytest
import torch

import learnedopt

CASES = [
    (lambda: learnedopt.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (lambda: learnedopt.sgd(0.1, 0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (lambda: learnedopt.sgd(0.1, 0.9, True), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
    (lambda: learnedopt.adam(0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
    (lambda: learnedopt.rmsprop(0.01), lambda p: torch.optim.RMSprop(p, lr=0.01)),
]


@pytest.mark.parametrize("make_rule, make_torch", CASES)
def test_rule_matches_torch_optim(make_rule, make_torch):
    torch.manual_seed(0)
    target = torch.randn(5, 3, dtype=torch.float64)
    ours = torch.zeros(5, 3, dtype=torch.float64)
    theirs = torch.nn.Parameter(ours.clone())
    rule, opt = make_rule(), make_torch([theirs])
    state = rule.init([ours])
    for _ in range(10):
        grad = 2 * (ours - target) + 0.1 * torch.randn_like(ours)
        (updates,), state = rule.update([grad], state, [ours])
        ours = ours + updates
        theirs.grad = grad.clone()
        opt.step()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)


def test_rules_do_not_mutate_inputs():
    rule = learnedopt.adam(0.1)
    p, g = torch.ones(3), torch.ones(3)
    state = rule.init([p])
    before = {k: v.clone() for k, v in state[0].items()}
    rule.update([g], state, [p])
    for k, v in state[0].items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_rules_reject_bad_lr(bad):
    with pytest.raises(ValueError, match="learning rate"):
        learnedopt.sgd(bad)
