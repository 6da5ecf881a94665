"""No gradient, weight or file makes the optimizer write NaN into a model (issue 17, items 2 and 3)."""

import math

import pytest
import torch

from learnedopt import CoordinatewiseLSTM, LearnedOptimizer, LSTMRule, load_net, save_net
from learnedopt.lstm import largest_gradient

PATHS = {"kernel": "kernel", "torch ops": "torch"}


def _random_net(**config) -> CoordinatewiseLSTM:
    torch.manual_seed(0)
    net = CoordinatewiseLSTM(**config)
    for p in net.parameters():
        p.data.normal_(0.0, 0.5)
    return net


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("inputs", ["normalized", "paper"])
def test_one_huge_gradient_does_not_freeze_a_coordinate(path, inputs):
    """``g = 1e30`` squared overflows float32: it is skipped and counted, and the coordinate keeps training."""
    net = _random_net(inputs=inputs, output="adam", output_scale=1e-3)
    p = torch.nn.Parameter(torch.zeros(10))
    opt = LearnedOptimizer([p], net=net, backend=PATHS[path])
    positions = []
    for g in (1.0, 1e30, 1.0, 1.0):
        p.grad = torch.full_like(p, g)
        opt.step()
        positions.append(p.detach().clone())
    state = opt.state[p]
    for key, value in state.items():
        assert torch.isfinite(value.float()).all(), key
    assert int(state["nonfinite"]) == 10  # the one huge step, on every coordinate
    assert torch.equal(positions[1], positions[0])  # skipped: no move
    assert (positions[3] != positions[2]).all() and (positions[2] != positions[1]).all()  # trains on


def test_largest_gradient_is_where_the_square_still_fits():
    for dtype in (torch.float32, torch.float64):
        limit = torch.tensor(largest_gradient(dtype), dtype=dtype)
        assert torch.isfinite(limit * limit) and not torch.isfinite((limit * 2**40) ** 2)


def test_one_huge_gradient_in_the_differentiable_path():
    net = _random_net(inputs="normalized", output="adam", output_scale=1e-3)
    rule = LSTMRule(net)
    params = [torch.zeros(6)]
    state = rule.init(params)
    updates = []
    with torch.enable_grad():
        for g in (1.0, 1e30, 1.0, 1.0):
            update, state = rule.update([torch.full((6,), g)], state, params)
            updates.append(update[0])
        assert updates[-1].requires_grad  # really the differentiable path
    for key, value in state[0].items():
        assert torch.isfinite(value.detach()).all(), key
    assert int(state[0]["nonfinite"]) == 6 and torch.equal(updates[1], torch.zeros(6))
    assert (updates[3] != 0).all()
    loss = sum(u.sum() for u in updates)
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("output", ["adam", "linear"])
def test_a_net_with_nan_weights_keeps_the_update_finite_and_bounded(path, output):
    net = CoordinatewiseLSTM(inputs="normalized", output=output, output_scale=1e-3)
    for p in net.parameters():
        p.data.fill_(float("nan"))
    p = torch.nn.Parameter(torch.randn(200))
    opt = LearnedOptimizer([p], net=net, backend=PATHS[path])
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(200) * 10.0 ** torch.randint(-6, 6, (200,))
        opt.step()
        moved = (p.detach() - before).abs()
        assert torch.isfinite(p).all()
        assert moved.max() <= 1e-3 * 101 * (1 + 1e-6)  # lr * output_scale * (magnitude_range + 1)
    if output == "adam":  # a NaN net's raw outputs count as zero: the nominal Adam step
        assert moved.min() > 0


def _poisoned(tmp_path, tensor_name: str = "head.bias"):
    net = CoordinatewiseLSTM(inputs="normalized", output="adam")
    path = save_net(net, tmp_path / "net.pt")
    blob = torch.load(path, weights_only=True)
    del blob["sha256"]
    blob["state_dict"][tensor_name][0] = float("nan")
    return path, blob


def test_a_net_file_with_non_finite_weights_is_refused(tmp_path):
    from learnedopt.pretrained import atomic_save

    path, blob = _poisoned(tmp_path)
    atomic_save(blob, path)  # a valid digest over NaN weights
    with pytest.raises(ValueError, match=r"net\.pt.*non-finite") as caught:
        load_net(path)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="non-finite"):
        LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], net=str(path))


def test_a_net_file_whose_header_claims_a_huge_net_is_refused_before_allocating(tmp_path):
    """A header of ``hidden_size`` 10^7 over a small payload would ask for ~10^15 bytes; it is one line instead."""
    from learnedopt.pretrained import atomic_save

    path, blob = _poisoned(tmp_path)
    blob["state_dict"]["head.bias"][0] = 0.0
    for hidden, layers in ((10**7, 2), (2000, 2), (20, 10**6)):
        blob["config"] = {**blob["config"], "hidden_size": hidden, "num_layers": layers}
        atomic_save(blob, path)
        with pytest.raises(ValueError, match=r"net\.pt.*do not match") as caught:
            load_net(path)
        assert "\n" not in str(caught.value) and math.isfinite(hidden)


def test_save_net_refuses_non_finite_weights(tmp_path):
    net = CoordinatewiseLSTM()
    net.head.bias.data[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        save_net(net, tmp_path / "net.pt")
    assert not (tmp_path / "net.pt").exists()
