"""The bounded, scale-free LSTM optimizer (inputs="normalized", output="adam"): safety that holds for any weights."""

import itertools

import pytest
import torch

from learnedopt import CoordinatewiseLSTM, LearnedOptimizer, LSTMConfig, LSTMRule, load_net, save_net

GENERAL = dict(inputs="normalized", output="adam", output_scale=1e-3)


def _random_net(**config: object) -> CoordinatewiseLSTM:
    """A net with large random weights everywhere, head included: its safety must not come from training."""
    torch.manual_seed(3)
    net = CoordinatewiseLSTM(LSTMConfig(**{**GENERAL, **config}))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 2.0)
    return net


def test_zero_gradient_is_a_no_op_and_never_drifts():
    model = torch.nn.Linear(5, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters(), net=_random_net())
    for _ in range(100):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_unused_rows_stay_put_while_others_train():
    emb = torch.nn.Embedding(10, 4)
    before = emb.weight.detach().clone()
    opt = LearnedOptimizer(emb.parameters(), net=_random_net())
    for _ in range(20):
        opt.zero_grad()
        emb(torch.tensor([1, 2])).pow(2).sum().backward()
        opt.step()
    assert torch.equal(emb.weight[3:], before[3:])
    assert not torch.equal(emb.weight[1:3], before[1:3])


@pytest.mark.parametrize("lr", [1.0, 0.3])
def test_update_is_bounded_for_any_weights_and_gradient_scale(lr):
    net = _random_net(magnitude_range=10.0)
    rule = LSTMRule(net)
    params = [torch.zeros(2000)]
    state = rule.init(params)
    bound = 1e-3 * (10.0 + 1)
    largest = 0.0
    for t in range(30):
        g = torch.randn(2000) * 10.0 ** torch.randint(-8, 9, (2000,)).float()
        (u,), state = rule.update([g], state, params)
        largest = max(largest, float((u * lr).detach().abs().max()))
    assert largest <= bound * lr * (1 + 1e-6)
    assert largest > 0.2 * bound * lr  # the bound is not vacuous: random weights reach a good part of it


def test_untrained_general_net_is_adam():
    """A zero head is Adam at lr=output_scale (whose direction stays within the clip on a smooth problem)."""
    torch.manual_seed(0)
    w = torch.randn(50)
    target = torch.randn(50)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = LearnedOptimizer([a], net=CoordinatewiseLSTM(LSTMConfig(**GENERAL)))  # type: ignore[arg-type]
    adam = torch.optim.Adam([b], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(50):
        for p, opt in ((a, ours), (b, adam)):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_normalized_rule_is_invariant_to_gradient_scale():
    net = _random_net()
    rule = LSTMRule(net)
    params = [torch.zeros(300)]
    grads = [torch.randn(300) for _ in range(10)]
    results = []
    for c in (1e-2, 1.0, 1e4):
        state = rule.init(params)
        for g in grads:
            (u,), state = rule.update([g * c], state, params)
        results.append(u)
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(results[2], results[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("inputs,output", list(itertools.product(["paper", "normalized"], ["linear", "adam"])))
def test_every_feature_set_round_trips_through_a_net_file(tmp_path, inputs, output):
    net = _random_net(inputs=inputs, output=output, momentum_decays=(0.9, 0.7), hidden_size=6)
    loaded = load_net(save_net(net, tmp_path / "net.pt"))
    assert loaded.config == net.config
    g = [torch.randn(40)]
    out = []
    for n in (net, loaded):
        rule = LSTMRule(n)
        state = rule.init(g)
        for _ in range(3):
            (u,), state = rule.update(g, state, g)
        out.append(u)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_moment_state_round_trips_and_skips_nonfinite_coordinates():
    net = _random_net()
    w = torch.nn.Parameter(torch.zeros(4))
    opt = LearnedOptimizer([w], net=net)
    w.grad = torch.ones(4)
    opt.step()
    m, v = opt.state[w]["m"].clone(), opt.state[w]["v"].clone()
    w.grad = torch.tensor([float("nan"), 2.0, float("inf"), 1.0])
    before = w.detach().clone()
    opt.step()
    assert torch.equal(opt.state[w]["m"][:, [0, 2]], m[:, [0, 2]]) and torch.equal(opt.state[w]["v"][[0, 2]], v[[0, 2]])
    assert torch.equal(w[[0, 2]], before[[0, 2]]) and int(opt.state[w]["nonfinite"]) == 2
    clone = LearnedOptimizer([torch.nn.Parameter(w.detach().clone())], net=net)
    clone.load_state_dict(opt.state_dict())
    assert torch.equal(clone.state_dict()["state"][0]["m"], opt.state[w]["m"])
