"""LearnedOptimizer behaves as a torch.optim.Optimizer and shares its math with the unroll engine."""

import copy
import warnings

import pytest
import torch
from torch import nn

import learnedopt
from learnedopt import CoordinatewiseLSTM, LearnedOptimizer


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)


def train(model, opt, steps, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 10, generator=g).to(dtype)
        y = x[:, :1] * 2 - x[:, 1:2]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_is_a_torch_optimizer(small_net):
    assert isinstance(LearnedOptimizer(mlp().parameters(), net=small_net), torch.optim.Optimizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_identically(small_net, dtype):
    model = mlp(dtype)
    opt = LearnedOptimizer(model.parameters(), net=small_net)
    train(model, opt, 5, seed=1, dtype=dtype)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, 5, seed=2, dtype=dtype)

    resumed = mlp(dtype)
    resumed.load_state_dict(saved_model)
    opt2 = LearnedOptimizer(resumed.parameters(), net=copy.deepcopy(small_net))
    opt2.load_state_dict(saved_opt)
    for p in resumed.parameters():
        assert opt2.state[p]["h"].dtype == torch.float32  # hidden state keeps its own dtype
    train(resumed, opt2, 5, seed=2, dtype=dtype)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert a.dtype == dtype and torch.equal(a, b)


def test_add_param_group_and_untouched_params(small_net):
    model = mlp()
    frozen = nn.Parameter(torch.ones(3))
    extra = nn.Parameter(torch.ones(4))
    opt = LearnedOptimizer(list(model.parameters()) + [frozen], net=small_net)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5
    before = extra.detach().clone()
    train(model, opt, 2)
    extra.grad = torch.ones(4)
    opt.step()
    assert frozen.grad is None and torch.equal(frozen, torch.ones(3)) and len(opt.state[frozen]) == 0
    assert not torch.equal(extra, before)


def test_lr_multiplies_the_update_so_schedulers_work(small_net):
    deltas = []
    for factor in (1.0, 0.25):
        model = mlp()
        opt = LearnedOptimizer(model.parameters(), net=small_net)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch, f=factor: f)
        before = [p.detach().clone() for p in model.parameters()]
        train(model, opt, 1)
        sched.step()
        deltas.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    assert all(d.abs().sum() > 0 for d in deltas[0])
    for full, quarter in zip(*deltas):
        torch.testing.assert_close(quarter, 0.25 * full)


def test_closure_loss_is_returned(small_net):
    model = mlp()
    opt = LearnedOptimizer(model.parameters(), net=small_net)
    x, y = torch.randn(8, 10), torch.randn(8, 1)
    computed = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        computed.append(loss)
        return loss

    assert opt.step(closure) is computed[0]


def test_small_cnn_with_mixed_shapes_trains_with_packaged_net():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    )
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    opt = LearnedOptimizer(model.parameters())
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for p in model.parameters():
        assert opt.state[p]["h"].shape == (2, p.numel(), 20)


def test_float64_parameters(small_net):
    model = mlp(torch.float64)
    opt = LearnedOptimizer(model.parameters(), net=small_net)
    train(model, opt, 3, dtype=torch.float64)
    for p in model.parameters():
        assert p.dtype == torch.float64 and opt.state[p]["h"].dtype == torch.float32


def test_state_dtype_option(small_net):
    model = mlp()
    opt = LearnedOptimizer(model.parameters(), net=small_net, state_dtype=torch.bfloat16)
    train(model, opt, 2)
    assert all(opt.state[p]["h"].dtype == torch.bfloat16 for p in model.parameters())


def test_step_and_unroll_engine_give_identical_updates(small_net):
    """One core: the optimizer's in-place step through torch ops and the differentiable engine run the same math,
    bit for bit (the fused CPU kernel equals them within rounding: tests/test_kernel.py)."""
    model = mlp()
    engine_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = [(torch.randn(16, 10), torch.randn(16, 1)) for _ in range(4)]
    opt = LearnedOptimizer(model.parameters(), net=small_net, backend="torch")
    for x, y in batches[:3]:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    loss_fn = learnedopt.module_loss(model, nn.functional.mse_loss)
    rule = learnedopt.LSTMRule(small_net, backend="torch")
    out = learnedopt.unroll(loss_fn, engine_params, rule, None, 3, lambda t: batches[t])
    for name, p in model.named_parameters():
        assert torch.equal(out.params[name].detach(), p.detach()), name
        assert torch.equal(out.state[list(engine_params).index(name)]["h"].detach(), opt.state[p]["h"])


def test_compiled_step_matches_eager(small_net):
    """``compile=True`` (full chunks through torch.compile, the remainder eager) changes results only by rounding
    (on torch ops: where the fused CPU kernel runs, it takes precedence)."""
    try:
        compiled = torch.compile(lambda x: x + 1)
        compiled(torch.zeros(1))
    except Exception as err:  # no C++ toolchain for inductor on this machine
        pytest.skip(f"torch.compile is unavailable here: {err}")
    models = [mlp(), mlp()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [LearnedOptimizer(m.parameters(), net=small_net, chunk_size=64, compile=flag, backend="torch")
            for m, flag in zip(models, (False, True))]
    for model, opt in zip(models, opts):
        torch.manual_seed(3)
        train(model, opt, 3)
    assert opts[1].rule._compiled is not None  # the compiled path did run
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opts[1].state[q]["h"], opts[0].state[p]["h"], rtol=1e-5, atol=1e-5)


def test_nan_gradient_never_reaches_params_or_state(small_net):
    model = mlp()
    opt = LearnedOptimizer(model.parameters(), net=small_net)
    train(model, opt, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
        p.grad.view(-1)[0] = 1.0
    opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all()
        assert torch.isfinite(opt.state[p]["h"]).all() and torch.isfinite(opt.state[p]["c"]).all()
        assert int(opt.state[p]["nonfinite"]) == p.numel() - 1


@pytest.mark.parametrize("lr", [-1.0, float("nan"), float("inf")])
def test_bad_lr_is_a_value_error(small_net, lr):
    with pytest.raises(ValueError, match="Invalid learning rate"):
        LearnedOptimizer(mlp().parameters(), net=small_net, lr=lr)
    opt = LearnedOptimizer(mlp().parameters(), net=small_net)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lr": lr})


@pytest.mark.parametrize(
    "tensor", [torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.complex64)], ids=["int", "complex"]
)
def test_non_real_parameters_are_a_type_error_naming_the_parameter(small_net, tensor):
    with pytest.raises(TypeError, match="parameter 1 of param group 0"):
        LearnedOptimizer([nn.Parameter(torch.ones(2)), tensor], net=small_net)


def test_named_parameters_appear_in_the_error(small_net):
    if torch.torch_version.TorchVersion(torch.__version__) < "2.6":
        pytest.skip("named parameters in optimizers need torch >= 2.6")
    params = [("weight", nn.Parameter(torch.ones(2))), ("counts", torch.ones(2, dtype=torch.int32))]
    with pytest.raises(TypeError, match="counts"):
        LearnedOptimizer(params, net=small_net)


def test_sparse_parameters_and_gradients_are_a_type_error(small_net):
    with pytest.raises(TypeError, match="sparse"):
        LearnedOptimizer([torch.ones(3).to_sparse()], net=small_net)
    p = nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([p], net=small_net)
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_bad_net_argument(tmp_path):
    with pytest.raises(ValueError, match="quadratic-lstm"):
        LearnedOptimizer([nn.Parameter(torch.ones(1))], net="no-such-net")
    with pytest.raises(TypeError, match="net must be"):
        LearnedOptimizer([nn.Parameter(torch.ones(1))], net=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_matches_cpu(small_net):
    cpu = mlp()
    gpu = copy.deepcopy(cpu).cuda()
    opt_cpu = LearnedOptimizer(cpu.parameters(), net=small_net)
    opt_gpu = LearnedOptimizer(gpu.parameters(), net=small_net)
    for step in range(5):
        x, y = torch.randn(16, 10), torch.randn(16, 1)
        for model, opt, dev in ((cpu, opt_cpu, "cpu"), (gpu, opt_gpu, "cuda")):
            opt.zero_grad()
            nn.functional.mse_loss(model(x.to(dev)), y.to(dev)).backward()
            opt.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        assert b.is_cuda and opt_gpu.state[b]["h"].is_cuda
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)


def _trained_pair(opt_factory):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2)
    opt = opt_factory(model.parameters())
    x, y = torch.randn(32, 6), torch.randn(32, 2)

    def step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return model, opt, step


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize(
    "factory",
    [
        lambda p: learnedopt.LearnedOptimizer(p),
        lambda p: learnedopt.LearnedOptimizer(p, net="mnist-lstm"),
        lambda p: learnedopt.RuleOptimizer(p, learnedopt.adam(1e-2)),
    ],
)
def test_copied_optimizer_continues_bit_identically(how, factory):
    import copy
    import pickle

    model, opt, step = _trained_pair(factory)
    for _ in range(3):
        step()
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    for m, o in ((model, opt), (model2, opt2)):
        for _ in range(3):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_multi_element_tensor_lr_is_refused_like_torch():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        learnedopt.LearnedOptimizer([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor([1.0, 2.0]))


def test_adam_rule_loads_a_state_dict_whose_step_is_a_number():
    w = torch.nn.Parameter(torch.ones(3))
    reference = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    reference.step()
    saved = copy.deepcopy(reference.state_dict())
    saved["state"][0]["step"] = 1.0  # how older torch.optim.Adam checkpoints store it
    v = torch.nn.Parameter(w.detach().clone())
    opt = learnedopt.RuleOptimizer([v], learnedopt.adam(1.0), lr=0.1)  # the group lr scales the rule
    opt.load_state_dict(saved)
    v.grad = torch.ones(3)
    w.grad = torch.ones(3)
    opt.step()
    reference.step()
    torch.testing.assert_close(v, w)


def _state_after_one_step(**options) -> dict:
    """The state dict of a LearnedOptimizer that has taken one step on a 3-element parameter."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = learnedopt.LearnedOptimizer([w], **options)
    w.grad = torch.ones(3)
    opt.step()
    return opt.state_dict()


def test_load_state_dict_keeps_what_a_pre_hook_put_in():
    saved = _state_after_one_step()
    fresh = learnedopt.LearnedOptimizer([torch.nn.Parameter(torch.ones(3))])

    def zero_hidden_state(optimizer, state_dict):
        state_dict = copy_state(state_dict)
        state_dict["state"][0]["h"] = torch.zeros_like(state_dict["state"][0]["h"])
        return state_dict

    def copy_state(state_dict):
        return {**state_dict, "state": {k: dict(v) for k, v in state_dict["state"].items()}}

    fresh.register_load_state_dict_pre_hook(zero_hidden_state)
    fresh.load_state_dict(saved)
    p = fresh.param_groups[0]["params"][0]
    assert torch.count_nonzero(fresh.state[p]["h"]) == 0
    assert torch.count_nonzero(saved["state"][0]["h"]) > 0


def test_state_dict_names_its_net_and_refuses_a_mismatched_one():
    saved = _state_after_one_step(net="mnist-lstm")
    assert saved["net"]["config"]["hidden_size"] == 20 and len(saved["net"]["digest"]) == 64
    other_shape = learnedopt.LearnedOptimizer([torch.nn.Parameter(torch.ones(3))], net=CoordinatewiseLSTM(hidden_size=8))
    with pytest.raises(ValueError, match="another architecture"):
        other_shape.load_state_dict(saved)
    same_shape = learnedopt.LearnedOptimizer([torch.nn.Parameter(torch.ones(3))], net="quadratic-lstm")
    with pytest.warns(UserWarning, match="different net of the same shape"):
        same_shape.load_state_dict(saved)
    twin = learnedopt.LearnedOptimizer([torch.nn.Parameter(torch.ones(3))], net="mnist-lstm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin.load_state_dict(saved)


def test_repr_and_defaults_show_every_setting():
    opt = learnedopt.LearnedOptimizer([torch.nn.Parameter(torch.ones(2))], net="mnist-lstm", chunk_size=128)
    assert opt.defaults["net"] == "mnist-lstm" and opt.defaults["chunk_size"] == 128
    assert opt.defaults["state_dtype"] is None and opt.defaults["compile"] is False
    text = repr(opt)
    assert "mnist-lstm" in text and "chunk_size: 128" in text
    with pytest.raises(ValueError, match="for the whole optimizer"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "chunk_size": 7})
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.5})
    assert opt.param_groups[1]["chunk_size"] == 128


def test_whole_step_compiles_with_fullgraph_and_matches_eager():
    """``torch.compile(opt.step, fullgraph=True)``: no host sync in the step (the non-finite check is masked)."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1))
    except Exception as err:  # no C++ compiler or no inductor backend on this machine
        pytest.skip(f"torch.compile is unavailable here: {err}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    twin = copy.deepcopy(model)
    opt, ref = LearnedOptimizer(model.parameters()), LearnedOptimizer(twin.parameters())
    step = torch.compile(opt.step, fullgraph=True)
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    for _ in range(3):
        for m, s in ((model, step), (twin, ref.step)):
            for p in m.parameters():
                p.grad = None
            nn.functional.mse_loss(m(x), y).backward()
            s()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    bad = [p for p in model.parameters()][0]
    bad.grad = torch.full_like(bad, float("nan"))
    before = bad.detach().clone()
    step()
    assert torch.equal(bad, before)  # the masked path still skips non-finite coordinates


def test_load_state_dict_keeps_entries_that_are_not_parameter_indices():
    saved = _state_after_one_step()
    saved["state"]["extra"] = {"note": torch.ones(1)}  # torch.optim keeps such entries; it must not crash
    fresh = learnedopt.LearnedOptimizer([torch.nn.Parameter(torch.ones(3))])
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.state["extra"]["note"], torch.ones(1))
