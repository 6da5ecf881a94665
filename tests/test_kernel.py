"""The fused CPU step (learnedopt/lstm_kernel.c) against the torch ops it replaces."""

import shutil
import subprocess
import sys

import pytest
import torch

import learnedopt._kernel.build as kernel
from learnedopt import CoordinatewiseLSTM, LearnedOptimizer

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler: the kernel cannot be built"
)

ARCHS = {  # every input set and output map, and sizes that are not a multiple of the vector width
    "general": dict(inputs="normalized", output="adam", output_scale=1e-3),
    "paper": dict(),
    "paper-inputs-adam-output": dict(inputs="paper", output="adam"),
    "odd-sizes": dict(hidden_size=7, num_layers=3, inputs="normalized", momentum_decays=(0.9, 0.3)),
}


def _net(arch: str) -> CoordinatewiseLSTM:
    torch.manual_seed(3)
    net = CoordinatewiseLSTM(**ARCHS[arch])
    for p in net.parameters():  # weights large enough that every gate saturates somewhere
        p.data.normal_(0.0, 0.5)
    return net


def _pair(net, **options):
    """Identical parameters (a matrix, a small bias, one split across threads) under the kernel and torch ops."""
    shapes = [(300, 70), (5,), (40_000,)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fused = LearnedOptimizer(ps, net=net, backend="kernel", **options)
    return ps, qs, fused, LearnedOptimizer(qs, net=net, backend="torch", **options)


def _gradients(ps, step):
    grads = []
    for p in ps:  # scales from 1e-7 to 10 (both branches of the paper's log/sign features)
        scales = torch.logspace(-7, 1, p.numel())[torch.randperm(p.numel())]
        g = torch.randn(p.shape) * scales.reshape(p.shape)
        if step == 2:
            g.view(-1)[[1, 3]] = torch.tensor([float("nan"), float("inf")])
        if step == 4:
            g.view(-1)[0] = 0.0
        grads.append(g)
    return grads


def _step_both(ps, qs, fused, ops, grads):
    """One step of both optimizers with the same gradients."""
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g, g.clone()
    fused.step()
    ops.step()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_kernel_equals_torch_ops(arch):
    ps, qs, fused, ops = _pair(_net(arch))
    for step in range(8):
        _step_both(ps, qs, fused, ops, _gradients(ps, step))
    for p, q in zip(ps, qs):
        a, b = fused.state[p], ops.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)  # steps of up to ~10 (output_scale 0.1 x 101)
    assert int(fused.state[ps[0]]["nonfinite"]) == 2  # the NaN and the Inf were skipped, and counted


def test_kernel_bfloat16_state_within_one_rounding():
    """One step from the same bfloat16 state: the kernel's new state is within one bfloat16 rounding of the ops'."""
    ps, qs, fused, ops = _pair(_net("general"), state_dtype=torch.bfloat16)
    for step in range(3):
        _step_both(ps, qs, fused, ops, _gradients(ps, step))
        for p, q in zip(ps, qs):  # re-synchronize, so that the comparison is of one step
            for key, value in ops.state[q].items():
                fused.state[p][key].copy_(value)
            p.data.copy_(q.data)
    _step_both(ps, qs, fused, ops, _gradients(ps, 5))
    for p, q in zip(ps, qs):
        for key in ("h", "c"):
            a, b = fused.state[p][key].float(), ops.state[q][key].float()
            assert fused.state[p][key].dtype == torch.bfloat16
            torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6, msg=key)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_kernel_is_independent_of_thread_count():
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(70_000))
            opt = LearnedOptimizer([p], net=_net("general"), backend="kernel")
            for step in range(3):
                p.grad = _gradients([p], step)[0]
                opt.step()
            results.append((p.detach().clone(), opt.state[p]["h"].clone()))
        finally:
            torch.set_num_threads(1)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_state_dict_moves_between_kernel_and_torch_ops():
    net = _net("general")
    ps, qs, fused, ops = _pair(net)
    for p, g in zip(ps, _gradients(ps, 0)):
        p.grad = g
    fused.step()
    ops.load_state_dict(fused.state_dict())
    for p, q in zip(ps, qs):
        q.data.copy_(p.data)
    _step_both(ps, qs, fused, ops, _gradients(ps, 1))
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_where_the_kernel_does_not_apply():
    """A float64 net runs on torch ops under the default; backend="kernel" says why it cannot run."""
    net = _net("general").double()
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    p.grad = torch.randn(10, dtype=torch.float64)
    LearnedOptimizer([p], net=net).step()
    assert p.dtype == torch.float64 and torch.isfinite(p).all()
    with pytest.raises(RuntimeError, match="float32 net"):
        LearnedOptimizer([p], net=net, backend="kernel").step()


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """Without a C compiler the default path warns once and gives the torch ops' results; backend="kernel" raises."""
    script = """
import warnings, torch, learnedopt
torch.manual_seed(0)
net = learnedopt.CoordinatewiseLSTM(inputs="normalized", output="adam")
p, q = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
q.data.copy_(p.data)
a, b = learnedopt.LearnedOptimizer([p], net=net), learnedopt.LearnedOptimizer([q], net=net, backend="torch")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        p.grad = torch.randn(50); q.grad = p.grad.clone(); a.step(); b.step()
assert torch.equal(p, q)
messages = [str(w.message) for w in caught if "fused CPU step" in str(w.message)]
assert len(messages) == 1 and "no C compiler" in messages[0], messages
try:
    learnedopt.LearnedOptimizer([p], net=net, backend="kernel").step()
except RuntimeError as err:
    assert "no C compiler" in str(err), err
else:
    raise AssertionError("backend='kernel' ran without a compiler")
"""
    env = {"PATH": str(tmp_path), "LEARNEDOPT_KERNEL_CACHE": str(tmp_path / "cache"), "CC": "no-such-compiler"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_library_is_cached_per_cpu_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LEARNEDOPT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel, "_LIBRARIES", {})
    settings = kernel.Build(hidden=5, layers=1, decays=1, paper=False, adam=False, outputs=1)
    kernel.load(settings)
    built = sorted(tmp_path.glob("lstm_step_*.so"))
    assert len(built) == 1
    monkeypatch.setattr(kernel, "_LIBRARIES", {})
    monkeypatch.setenv("CC", "no-such-compiler")  # a cached library needs no compiler ...
    monkeypatch.setattr(kernel.shutil, "which", lambda name: "/bin/true" if name == "no-such-compiler" else None)
    kernel.load(settings)
    assert sorted(tmp_path.glob("lstm_step_*.so")) == built
    monkeypatch.setattr(kernel, "_cpu_identity", lambda: "another CPU")  # ... but another CPU needs its own build
    monkeypatch.setattr(kernel, "_LIBRARIES", {})
    with pytest.raises(kernel.KernelUnavailable), pytest.warns(UserWarning, match="fused CPU step"):
        kernel.load(settings)
    assert kernel.cache_dir() == tmp_path
