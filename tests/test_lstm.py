import math
import shutil

import pytest
import torch

from learnedopt import CoordinatewiseLSTM, LSTMRule, preprocess_gradient, unroll
from learnedopt.lstm import chunks


def test_preprocessing_matches_hand_computed_values():
    p = 10.0
    e = math.exp(-p)
    g = torch.tensor([1.0, -math.e, 2 * e, e / 2, -e / 4, 0.0], dtype=torch.float64)
    expected = torch.tensor(
        [
            [0.0, 1.0],  # log(1)/10, sign
            [0.1, -1.0],  # log|-e|/10 = 0.1, negative sign
            [math.log(2 * e) / p, 1.0],  # just above the threshold: log branch
            [-1.0, 0.5],  # below the threshold: (-1, e^p g)
            [-1.0, -0.25],
            [-1.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(preprocess_gradient(g, p), expected)


def test_preprocessing_second_derivative_is_finite_at_zero():
    g = torch.tensor([0.0, 1e-8, 3.0], requires_grad=True)
    (d,) = torch.autograd.grad(preprocess_gradient(g).sum(), g, create_graph=True)
    assert torch.isfinite(d).all()


def test_architecture_is_the_papers():
    net = CoordinatewiseLSTM()
    assert [c.input_size for c in net.cells] == [2, 20] and all(c.hidden_size == 20 for c in net.cells)
    assert net.head.in_features == 20 and net.head.out_features == 1
    # weights are shared across coordinates: the parameter count does not depend on the problem size
    assert sum(p.numel() for p in net.parameters()) == 4 * 20 * (2 + 20 + 2) + 4 * 20 * (20 + 20 + 2) + 21


def test_output_is_scaled_and_coordinatewise(small_net):
    g = torch.randn(7)
    rule = LSTMRule(small_net)
    (full,), _ = rule.update([g], rule.init([g]), [g])
    (one,), _ = rule.update([g[3:4]], rule.init([g[3:4]]), [g[3:4]])
    torch.testing.assert_close(full[3:4], one)  # each coordinate only sees its own gradient
    scaled = CoordinatewiseLSTM(output_scale=1.0)
    scaled.load_state_dict(small_net.state_dict())
    raw, _ = scaled(preprocess_gradient(g), scaled.initial_state(7))
    torch.testing.assert_close(raw[:, 0] * 0.1, full)


def test_flat_batching_does_not_change_results(small_net):
    """Chunks that split a large tensor and pack small ones (and an empty one) give each tensor's own result."""
    g = [torch.randn(1000), torch.randn(3, 7), torch.randn(0), torch.randn(5), torch.randn(40, 2), torch.randn(1)]
    params = [torch.zeros_like(x) for x in g]
    alone = LSTMRule(small_net, chunk_size=10**6)
    expected = [alone.update([x], alone.init([p]), [p]) for x, p in zip(g, params)]
    small = LSTMRule(small_net, chunk_size=64)
    plan = chunks.plan([x.numel() for x in g], 64)  # tensors of >= 16 rows get their own chunks, the rest share one
    assert [[i for i, _ in chunk] for chunk in plan] == [[0]] * 16 + [[1], [4], [4], [3, 5]]
    assert all(rows.stop - rows.start <= 64 for chunk in plan for _, rows in chunk)
    for grad_mode in (True, False):  # the unroll engine's path, then the optimizer's in-place path
        with torch.set_grad_enabled(grad_mode):
            updates, state = small.update(g, small.init(params), params)
        for (u_ref, (s_ref,)), u, s in zip(expected, updates, state):
            torch.testing.assert_close(u, u_ref[0])
            torch.testing.assert_close(s["h"], s_ref["h"])
            torch.testing.assert_close(s["c"], s_ref["c"])


def test_nonfinite_gradients_are_skipped_and_counted(small_net):
    rule = LSTMRule(small_net)
    params = [torch.zeros(4)]
    state = rule.init(params)
    _, state = rule.update([torch.ones(4)], state, params)
    g = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")])
    (u,), (new,) = rule.update([g], state, params)
    assert torch.isfinite(u).all() and u[0] == 0 and u[2] == 0 and u[3] == 0 and u[1] != 0
    assert torch.equal(new["h"][:, [0, 2, 3]], state[0]["h"][:, [0, 2, 3]])
    assert not torch.equal(new["h"][:, 1], state[0]["h"][:, 1])
    assert int(new["nonfinite"]) == 3


def test_fused_cell_equals_torch_lstm_cell(small_net):
    from learnedopt.lstm.cell import gate_weight, lstm_cell

    cell = small_net.cells[1].double()
    x, h, c = (torch.randn(9, 20, dtype=torch.float64) for _ in range(3))
    expected_h, expected_c = cell(x, (h, c))
    got_h, got_c = lstm_cell(gate_weight(cell), x, h, c)
    torch.testing.assert_close(got_h, expected_h)
    torch.testing.assert_close(got_c, expected_c)


def test_fused_backward_passes_gradcheck_in_float64(small_net):
    from learnedopt.lstm.cell import FusedCell

    torch.manual_seed(0)
    weight = torch.randn(80, 4 + 20 + 1, dtype=torch.float64, requires_grad=True)
    x, h, c = (torch.randn(7, n, dtype=torch.float64, requires_grad=True) for n in (4, 20, 20))
    assert torch.autograd.gradcheck(FusedCell.apply, (weight, x, h, c))
    # and through the whole net, with some inputs not needing gradients
    net = small_net.double()
    features = torch.randn(5, net.config.input_size, dtype=torch.float64)
    state = [torch.randn(2, 5, 20, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda h, c: tuple(net.step(features, h, c)[0].unbind(1)), state)


@pytest.mark.parametrize("kernel", [True, False])
def test_fused_truncation_gradients_equal_the_op_by_op_reference(kernel):
    """A real meta-training truncation: the same meta-loss and meta-gradient with the fused cell (on the C kernel,
    or on torch ops with the compiled backward) and with autograd's op-by-op record."""
    from learnedopt.meta.tasks import ModuleFamily

    data = (torch.randn(512, 12), torch.randint(0, 4, (512,)))
    make = lambda: torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))  # noqa: E731
    family = ModuleFamily(make, data, torch.nn.functional.cross_entropy, 32)
    task = family.sample(3, torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    net = CoordinatewiseLSTM(inputs="normalized", output="adam", output_scale=1e-2)
    for p in net.head.parameters():  # a trained-looking head, so that gradients reach the cells
        torch.nn.init.normal_(p, std=0.5)
    results = {}
    for fused in (True, False):
        params = task.init_params(torch.Generator().manual_seed(1))
        rule = LSTMRule(net, chunk_size=100, backend=("auto" if kernel else "torch") if fused else "reference")
        out = unroll(task.loss, params, rule, None, 8, task.batch, transform=torch.log)
        results[fused] = (out.meta_loss.detach(), torch.autograd.grad(out.meta_loss, list(net.parameters())))
    # the torch forward is the same math as the reference; the kernel's sums run in another order
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6 if kernel else 0, atol=0)
    for fused_grad, reference in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(fused_grad, reference, rtol=1e-4, atol=1e-7)
        assert reference.abs().sum() > 0


@pytest.mark.skipif(not shutil.which("cc") and not shutil.which("gcc"), reason="no C compiler for the kernel")
@pytest.mark.parametrize("arch", ["paper", "general", "odd"])
@pytest.mark.parametrize("rows", [7, 200, 3000])
def test_kernel_lstm_equals_the_torch_cells(arch, rows):
    """All layers as one C-kernel node (forward and backward, a partial last block) against the torch cells with
    their fused backward, for every subset of inputs that needs a gradient."""
    from learnedopt.lstm.cell import gate_weight
    from learnedopt.lstm.kernel_ops import cell_library

    configs = {"paper": {}, "general": dict(inputs="normalized", output="adam"),
               "odd": dict(hidden_size=7, num_layers=3, inputs="normalized", momentum_decays=(0.9, 0.5))}
    torch.manual_seed(0)
    net = CoordinatewiseLSTM(**configs[arch])
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    layers, hidden = net.config.num_layers, net.config.hidden_size
    inputs = [torch.randn(rows, net.config.input_size), torch.randn(layers, rows, hidden),
              torch.randn(layers, rows, hidden)]
    assert cell_library([gate_weight(c) for c in net.cells], *inputs) is not None  # the kernel path does run
    upstream = [torch.randn(rows, net.head.out_features), torch.randn(layers, rows, hidden),
                torch.randn(layers, rows, hidden)]
    for needs in ((True, True, True), (False, True, True), (False, True, False)):
        results = {}
        for kernel in (True, False):
            leaves = [t.clone().requires_grad_(need) for t, need in zip(inputs, needs)]
            outputs = net.step(*leaves, backend="auto" if kernel else "torch")
            loss = sum((out * up).sum() for out, up in zip(outputs, upstream))
            wrt = [t for t in leaves if t.requires_grad] + list(net.parameters())
            results[kernel] = (*outputs, *torch.autograd.grad(loss, wrt))
        for got, expected in zip(results[True], results[False]):  # sums over rows: rounding grows with them
            scale = max(1.0, float(expected.detach().abs().max()))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


def test_bounded_adam_step_backward_passes_gradcheck():
    """The output map's hand-written backward, for the raw outputs and the nominal step (clipped on both sides,
    unseen coordinates included)."""
    from learnedopt.lstm.output import BoundedAdamStep

    torch.manual_seed(0)
    raw = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    nominal = torch.tensor([-3.0, -0.5, 0.2, 0.9, 2.0, -0.1, 0.7, -1.5, 0.3], dtype=torch.float64,
                           requires_grad=True)
    seen = torch.tensor([True] * 7 + [False] * 2)
    assert torch.autograd.gradcheck(lambda r, n: BoundedAdamStep.apply(r, n, seen, math.log(100.0), 0.1),
                                    (raw, nominal))


def test_second_order_maml_through_the_lstm_rule_is_unchanged_by_the_fused_backward():
    """MAML with the LSTM inner rule back-propagates once through the cells (into the inner gradients' graph)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    net = CoordinatewiseLSTM()
    grads = {}
    for fused in (True, False):
        params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        loss = lambda p, batch: torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)  # noqa: E731
        out = unroll(loss, params, LSTMRule(net, backend="auto" if fused else "reference"), None, 3, lambda t: None, second_order=True)
        grads[fused] = torch.autograd.grad(out.meta_loss, list(params.values()))
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_backward_falls_back_to_eager_math_where_compilation_fails(monkeypatch):
    """No C++ compiler, an unsupported platform: the same gradients, computed eagerly, and one warning."""
    import pytest

    import learnedopt.lstm.cell as cell

    def broken_compile(fn, **options):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(cell, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(0)
    net = CoordinatewiseLSTM()
    features = torch.randn(6, net.config.input_size)
    h, c = (torch.randn(2, 6, 20, requires_grad=True) for _ in range(2))
    with pytest.warns(UserWarning, match="torch.compile of the LSTM cell failed"):
        fused = torch.autograd.grad(net.step(features, h, c, backend="torch")[0].sum(), (h, c))  # the torch cell
    reference = torch.autograd.grad(net.step(features, h, c, backend="reference")[0].sum(), (h, c))
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b)


def test_second_order_meta_gradient_through_the_default_net_is_exact_and_finite():
    """With gradients that depend on the parameters (--second-order), the meta-gradient of a truncation through
    the moment-based net equals finite differences, also when some coordinates only ever see zero gradients
    (sqrt(v) at v = 0 once made it NaN)."""
    import learnedopt

    torch.manual_seed(0)
    x = torch.randn(256, 6, dtype=torch.float64)
    x[:, 0] = 0.0  # the first input is always zero: its weights' gradients are exactly zero
    y = torch.randint(0, 3, (256,))
    make = lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()  # noqa: E731
    family = learnedopt.ModuleFamily(make, (x, y), torch.nn.functional.cross_entropy, 32, name="mlp")
    task = family.sample(2, torch.Generator().manual_seed(0))
    start = task.init_params(torch.Generator().manual_seed(1))
    net = learnedopt.load_net("general-lstm").double()
    weights = list(net.parameters())

    def meta_loss(second_order: bool) -> torch.Tensor:
        rule = LSTMRule(net, backend="reference")
        return unroll(task.loss, start, rule, None, 6, task.batch, transform=torch.log,
                      second_order=second_order).meta_loss

    grads = torch.autograd.grad(meta_loss(True), weights)
    assert all(torch.isfinite(g).all() for g in grads)
    norm = torch.cat([g.flatten() for g in grads]).norm()
    direction = [g / norm for g in grads]
    eps = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1.0, -1.0):
            for w, d in zip(weights, direction):
                w.add_(sign * eps * d)
            values.append(float(meta_loss(False)))
            for w, d in zip(weights, direction):
                w.sub_(sign * eps * d)
    finite_difference = (values[0] - values[1]) / (2 * eps)
    assert abs(float(norm) - finite_difference) <= 1e-5 * abs(finite_difference)
