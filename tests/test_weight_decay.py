"""Decoupled weight decay (issue 20): AdamW's semantics at the net's nominal step, per param group."""

import pytest
import torch

import learnedopt
from learnedopt import LearnedOptimizer, RuleOptimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))


def _loss(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    return model(x).pow(2).mean()


def test_a_rule_with_decay_scale_equals_torch_adamw():
    ours, theirs = _model(), _model()
    opt = RuleOptimizer(ours.parameters(), learnedopt.adam(1e-2), weight_decay=0.3, decay_scale=1e-2)
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.3)
    for _ in range(5):
        for model, o in ((ours, opt), (theirs, reference)):
            o.zero_grad()
            _loss(model).backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_learned_optimizer_decays_by_lr_times_nominal_step_per_group():
    """One step with and without decay differs by exactly lr * output_scale * weight_decay * p, and only in the
    group that asked for it (Hugging Face's and timm's grouping: no decay on biases and norms)."""
    results = {}
    for decay in (0.0, 0.5):
        model = _model()
        matrices = [p for p in model.parameters() if p.ndim > 1]
        vectors = [p for p in model.parameters() if p.ndim <= 1]
        opt = LearnedOptimizer([{"params": matrices, "weight_decay": decay}, {"params": vectors, "weight_decay": 0.0}],
                               lr=2.0)
        start = [p.detach().clone() for p in model.parameters()]
        _loss(model).backward()
        opt.step()
        results[decay] = (start, [p.detach().clone() for p in model.parameters()], [p.ndim for p in model.parameters()])
    scale = learnedopt.load_net(learnedopt.DEFAULT_NET).config.output_scale
    (start, plain, ndims), (_, decayed, _) = results[0.0], results[0.5]
    for p0, a, b, ndim in zip(start, plain, decayed, ndims):
        expected = a - 2.0 * scale * 0.5 * p0 if ndim > 1 else a
        torch.testing.assert_close(b, expected, rtol=1e-6, atol=1e-8)
        assert ndim <= 1 or (b - a).abs().max() > 0


def test_weight_decay_is_validated_and_saved():
    model = _model()
    with pytest.raises(ValueError, match="weight_decay"):
        LearnedOptimizer(model.parameters(), weight_decay=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        LearnedOptimizer([{"params": model.parameters(), "weight_decay": float("nan")}])
    opt = LearnedOptimizer(model.parameters(), weight_decay=0.01)
    assert opt.state_dict()["param_groups"][0]["weight_decay"] == 0.01
    with pytest.raises(TypeError):
        LearnedOptimizer(model.parameters(), 1.0, 0.01)  # keyword-only, as everything after lr


def test_timm_builds_it_with_decay_groups():
    timm_optim = pytest.importorskip("timm.optim")
    from timm.optim._optim_factory import default_registry  # timm's public registration point (register())

    default_registry.register(timm_optim.OptimInfo(
        name="learnedopt", opt_class=LearnedOptimizer, description="learnedopt.LearnedOptimizer",
        has_momentum=False, has_eps=False, has_betas=False))
    model = _model()
    opt = timm_optim.create_optimizer_v2(model, "learnedopt", lr=1.0, weight_decay=0.05)
    assert isinstance(opt, LearnedOptimizer)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.05]  # biases and the norm's affine parameters get none
    _loss(model).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
