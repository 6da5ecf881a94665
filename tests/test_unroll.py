"""The unroll engine's meta-gradients against finite differences, in both gradient modes."""

import pytest
import torch

import learnedopt
from learnedopt import CoordinatewiseLSTM, LSTMRule, preprocess_gradient, unroll
from learnedopt_experiments.meta_train.tasks import QuadraticFamily


def tiny_problem():
    torch.manual_seed(3)
    net = CoordinatewiseLSTM(hidden_size=4, output_scale=0.3).double()
    task = QuadraticFamily(dim=3, init_std=1.0, dtype=torch.float64).sample(2, torch.Generator().manual_seed(0))
    theta0 = task.init_params(torch.Generator().manual_seed(1))
    return net, task, theta0


def flat_params(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def set_flat(net, vector):
    offset = 0
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(vector[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def directional_fd(fn, net, direction, eps=1e-6):
    base = flat_params(net)
    set_flat(net, base + eps * direction)
    plus = fn()
    set_flat(net, base - eps * direction)
    minus = fn()
    set_flat(net, base)
    return (plus - minus) / (2 * eps)


def engine_meta_grad(net, task, theta0, steps, second_order):
    out = unroll(task.loss, theta0, LSTMRule(net), None, steps, task.batch, second_order=second_order)
    grads = torch.autograd.grad(out.meta_loss, list(net.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]), out


def test_second_order_meta_gradient_matches_finite_differences():
    net, task, theta0 = tiny_problem()
    grad, _ = engine_meta_grad(net, task, theta0, 4, second_order=True)

    def meta_loss():
        with torch.no_grad():
            return unroll(task.loss, theta0, LSTMRule(net), None, 4, task.batch).meta_loss.item()

    for seed in range(3):
        v = torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert float(grad @ v) == pytest.approx(directional_fd(meta_loss, net, v), rel=1e-6, abs=1e-9)


def test_detached_meta_gradient_matches_finite_differences_of_its_surrogate():
    """Detached mode differentiates the unroll with each gradient held fixed at its recorded value.

    The surrogate below is written independently of the engine: it replays the recorded gradients.
    """
    net, task, theta0 = tiny_problem()
    steps = 4
    grad, out = engine_meta_grad(net, task, theta0, steps, second_order=False)
    recorded, theta = [], theta0["theta"].clone().requires_grad_()
    with torch.no_grad():
        state = net.initial_state(theta.numel())
        for _ in range(steps):
            with torch.enable_grad():
                (g,) = torch.autograd.grad(task.loss({"theta": theta}).sum(), theta)
            recorded.append(g)
            raw, state = net(preprocess_gradient(g.reshape(-1)), state)
            theta = (theta + raw[:, 0].view_as(theta) * net.config.output_scale).requires_grad_()

    def surrogate():
        with torch.no_grad():
            th, st, total = theta0["theta"].clone(), net.initial_state(theta.numel()), 0.0
            for g in recorded:
                raw, st = net(preprocess_gradient(g.reshape(-1)), st)
                th = th + raw[:, 0].view_as(th) * net.config.output_scale
                total += task.loss({"theta": th}).mean().item()
            return total

    assert surrogate() == pytest.approx(out.meta_loss.item(), rel=1e-12)
    for seed in range(3):
        v = torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert float(grad @ v) == pytest.approx(directional_fd(surrogate, net, v), rel=1e-6, abs=1e-9)


def test_the_two_modes_differ_when_the_loss_is_curved():
    net, task, theta0 = tiny_problem()
    detached, _ = engine_meta_grad(net, task, theta0, 3, second_order=False)
    full, _ = engine_meta_grad(net, task, theta0, 3, second_order=True)
    assert not torch.allclose(detached, full)


def test_second_order_gradient_wrt_initial_params_matches_finite_differences():
    """MAML differentiates through SGD steps into the initial parameters."""
    _, task, theta0 = tiny_problem()
    theta = theta0["theta"].clone().requires_grad_()
    rule = learnedopt.sgd(0.05)
    out = unroll(task.loss, {"theta": theta}, rule, None, 3, task.batch, second_order=True)
    (grad,) = torch.autograd.grad(out.meta_loss, theta)
    v = torch.randn_like(theta)

    def at(x):
        with torch.no_grad():
            return unroll(task.loss, {"theta": x}, rule, None, 3, task.batch).meta_loss.item()

    fd = (at(theta0["theta"] + 1e-6 * v) - at(theta0["theta"] - 1e-6 * v)) / 2e-6
    assert float((grad * v).sum()) == pytest.approx(fd, rel=1e-6)


def test_losses_weights_and_no_grad_evaluation():
    loss = lambda p, _: (p["x"] ** 2).sum()  # noqa: E731
    out = unroll(loss, {"x": torch.ones(3)}, learnedopt.sgd(0.25), None, 2, lambda t: None)
    torch.testing.assert_close(out.losses, torch.tensor([3.0, 0.75, 0.1875]))
    torch.testing.assert_close(out.meta_loss, torch.tensor(0.75 + 0.1875))
    last = unroll(loss, {"x": torch.ones(3)}, learnedopt.sgd(0.25), None, 2, lambda t: None, weights=[0, 0, 1])
    torch.testing.assert_close(last.meta_loss, torch.tensor(0.1875))
    with torch.no_grad():
        cheap = unroll(loss, {"x": torch.ones(3)}, learnedopt.sgd(0.25), None, 2, lambda t: None)
    assert cheap.meta_loss.grad_fn is None
    torch.testing.assert_close(cheap.losses, out.losses.detach())
    zero = unroll(loss, {"x": torch.ones(3)}, learnedopt.sgd(0.25), None, 0, lambda t: None, weights=[1.0])
    torch.testing.assert_close(zero.meta_loss, torch.tensor(3.0))
    with pytest.raises(ValueError, match="3 entries"):
        unroll(loss, {"x": torch.ones(3)}, learnedopt.sgd(0.25), None, 2, lambda t: None, weights=[1.0])


def test_module_loss_equals_module_forward():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    loss_fn = learnedopt.module_loss(net, torch.nn.functional.cross_entropy)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    torch.testing.assert_close(loss_fn(params, (x, y)), torch.nn.functional.cross_entropy(net(x), y))


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("segment", [1, 3, 7])
def test_checkpointed_unroll_gives_the_same_meta_gradient(second_order, segment):
    """Recomputing segments in backward (gradient checkpointing) changes memory, not the gradient."""
    net, task, theta0 = tiny_problem()
    results = []
    for checkpoint in (0, segment):
        out = unroll(task.loss, theta0, LSTMRule(net), None, 7, task.batch, second_order=second_order,
                     checkpoint=checkpoint)
        grads = torch.autograd.grad(out.meta_loss, list(net.parameters()))
        results.append((out.losses.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
