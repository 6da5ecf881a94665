"""The Triton step (the GPU twin of the C kernel) against the torch ops, on CPU tensors under Triton's interpreter
(issue 19): every input set and output map, odd sizes, NaN/Inf and huge gradients, bfloat16 state.

Triton's interpreter must be switched on before ``triton.language`` is first imported (torch imports it), so
:func:`test_under_the_interpreter` runs this file's other tests in a fresh process with ``TRITON_INTERPRET=1``.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from learnedopt import CoordinatewiseLSTM, LSTMRule  # noqa: E402
from learnedopt.lstm import triton_step  # noqa: E402

CHILD = os.environ.get("LEARNEDOPT_TRITON_CHILD") == "1"
in_child = pytest.mark.skipif(not CHILD, reason="runs in the interpreter process of test_under_the_interpreter")


@pytest.mark.skipif(CHILD, reason="the parent")
def test_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "LEARNEDOPT_TRITON_CHILD": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-o", "addopts=", "-p", "no:xdist",
                           "-p", "no:cacheprovider"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{len(ARCHS) + 2 + 4} passed" in done.stdout, done.stdout[-2000:]

ARCHS = {
    "general": dict(inputs="normalized", output="adam"),
    "paper": dict(),
    "paper-inputs-adam-output": dict(inputs="paper", output="adam"),
    "odd-sizes": dict(hidden_size=7, num_layers=3, inputs="normalized", momentum_decays=(0.9, 0.3)),
    "lean": dict(hidden_size=12, num_layers=1, inputs="normalized", output="adam"),
}




def _net(arch: str) -> CoordinatewiseLSTM:
    torch.manual_seed(3)
    net = CoordinatewiseLSTM(**ARCHS[arch])
    for p in net.parameters():  # weights large enough that every gate saturates somewhere
        p.data.normal_(0.0, 0.5)
    return net


def _grads(shapes, step, bad=False):
    g = torch.Generator().manual_seed(step)
    grads = [torch.randn(s, generator=g) * torch.logspace(-7, 1, torch.Size(s).numel()).reshape(s) for s in shapes]
    if bad:
        flat = grads[0].view(-1)
        flat[0], flat[3], flat[7] = float("nan"), float("inf"), 1e30  # 1e30: its square overflows float32
    return grads


@in_child
@pytest.mark.parametrize("arch", list(ARCHS))
def test_triton_step_equals_torch_ops(arch):
    net = _net(arch)
    shapes = [(13, 11), (5,), (130,)]  # partial blocks, a tiny tensor
    params = [torch.zeros(s) for s in shapes]
    reference, fused = LSTMRule(net, backend="torch"), triton_step.TritonStep(net)
    assert fused.why_not(_grads(shapes, 0), reference.init(params)) is None
    ref_state, state = reference.init(params), reference.init(params)
    for step in range(3):
        grads = _grads(shapes, step, bad=step == 1)
        with torch.no_grad():
            expected, ref_state = reference.update(grads, ref_state, params)
            got, state = fused(grads, state, params)
        for u, e in zip(got, expected):
            torch.testing.assert_close(u, e, rtol=1e-4, atol=1e-7)
        for s, r in zip(state, ref_state):
            for key in r:
                torch.testing.assert_close(s[key], r[key], rtol=1e-4, atol=1e-6, msg=f"{arch} {key} step {step}")
    assert int(state[0]["nonfinite"]) == 3 and int(state[1]["nonfinite"]) == 0


@in_child
def test_bfloat16_state_within_one_rounding():
    net = _net("general")
    params = [torch.zeros(300)]
    reference = LSTMRule(net, state_dtype=torch.bfloat16, backend="torch")
    fused = triton_step.TritonStep(net)
    ref_state, state = reference.init(params), reference.init(params)
    assert state[0]["h"].dtype == torch.bfloat16
    for step in range(3):
        grads = _grads([(300,)], step)
        with torch.no_grad():
            expected, ref_state = reference.update(grads, ref_state, params)
            got, state = fused(grads, state, params)
        torch.testing.assert_close(got[0], expected[0], rtol=2e-2, atol=1e-5)
        diff = (state[0]["h"].float() - ref_state[0]["h"].float()).abs()
        assert float(diff.max()) <= 2 * 2**-8  # at most a unit or two in bfloat16's last place (|h| < 1)


@in_child
def test_it_refuses_what_it_cannot_run(monkeypatch):
    net = _net("general")
    params = [torch.zeros(10)]
    state = LSTMRule(net).init(params)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in triton_step.TritonStep(net).why_not([torch.ones(10)], state)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "float32 net" in triton_step.TritonStep(_net("general").double()).why_not([torch.ones(10)], state)
    with pytest.raises(ValueError, match="another model"):
        triton_step.TritonStep(net)([torch.ones(11)], state, [torch.zeros(11)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_session.sh runs it)")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_on_cuda_the_optimizer_runs_the_triton_step(arch):
    """Compiled for a real GPU: LearnedOptimizer(backend="kernel") on CUDA equals the torch ops there."""
    net = _net(arch).cuda()
    shapes = [(300, 70), (5,), (40_000,)]
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    from learnedopt import LearnedOptimizer

    fused, ops = LearnedOptimizer(ps, net=net, backend="kernel"), LearnedOptimizer(qs, net=net, backend="torch")
    for step in range(3):
        for p, q, g in zip(ps, qs, _grads(shapes, step, bad=step == 1)):
            p.grad, q.grad = g.cuda(), g.cuda()
        fused.step()
        ops.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@in_child
@pytest.mark.parametrize("width, hidden, rows", [(4, 20, 7), (2, 20, 130), (7, 7, 70), (20, 20, 64)])
def test_triton_cell_forward_and_backward_equal_the_reference(width, hidden, rows):
    """The differentiable cell (GPU meta-training) against autograd's op-by-op record of the torch cell."""
    from learnedopt.lstm.cell import gate_weight, lstm_cell
    from learnedopt.lstm.triton_cell import TritonCell

    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(width, hidden)
    for p in cell.parameters():
        p.data.normal_(0.0, 0.5)
    x, h, c = torch.randn(rows, width), torch.randn(rows, hidden), torch.randn(rows, hidden)
    upstream = torch.randn(rows, hidden), torch.randn(rows, hidden)
    results = []
    for use_triton in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, h, c)]
        weight = gate_weight(cell)
        if use_triton:
            new_h, new_c = TritonCell.apply(weight, *leaves)
        else:
            new_h, new_c = lstm_cell(weight, *leaves, reference=True)
        loss = (new_h * upstream[0]).sum() + (new_c * upstream[1]).sum()
        results.append((new_h, new_c, *torch.autograd.grad(loss, [*leaves, *cell.parameters()])))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_session.sh runs it)")
def test_on_cuda_a_truncations_meta_gradient_through_triton_cells_equals_the_reference():
    from learnedopt import ModuleFamily, unroll

    data = (torch.randn(512, 12, device="cuda"), torch.randint(0, 4, (512,), device="cuda"))
    make = lambda: torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))  # noqa: E731
    task = ModuleFamily(make, data, torch.nn.functional.cross_entropy, 32, device="cuda").sample(
        3, torch.Generator().manual_seed(0))
    net = _net("general").cuda()
    results = []
    for backend in ("auto", "reference"):
        params = task.init_params(torch.Generator().manual_seed(1))
        out = unroll(task.loss, params, LSTMRule(net, backend=backend), None, 8, task.batch, transform=torch.log)
        results.append(torch.autograd.grad(out.meta_loss, list(net.parameters())))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)
