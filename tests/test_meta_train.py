"""Meta-training learns, resumes exactly, and refuses to mix runs."""

import pytest
import torch

from learnedopt import LSTMRule, MetaTrainConfig, MetaTrainer, load_net
from learnedopt.meta.evaluation import (
    BASELINES,
    TEST_SEED,
    TUNE_SEED,
    final_score,
    run_rule,
    tune_lr,
)
from learnedopt_experiments.meta_train.tasks import QuadraticFamily, get_family


def tiny_config(**overrides):
    values = dict(iterations=4, horizon=20, unroll=10, meta_batch=8, eval_every=2, eval_tasks=16, checkpoint_every=1)
    return MetaTrainConfig(**{**values, **overrides})


def test_short_meta_training_beats_untrained_net_and_tuned_sgd(tmp_path):
    config = MetaTrainConfig(
        iterations=60, meta_batch=64, objective="sum", eval_every=60, eval_tasks=64, eval_lengths=(100,), seed=0
    )
    trainer = MetaTrainer(QuadraticFamily(), config, tmp_path, progress=False)
    untrained = load_net(_save_untrained(trainer, tmp_path))
    trained = trainer.train()

    family = QuadraticFamily()
    test = family.sample(500, torch.Generator().manual_seed(TEST_SEED))
    tune = family.sample(256, torch.Generator().manual_seed(TUNE_SEED))
    sgd_lr, _ = tune_lr(tune, BASELINES["SGD"], 100)
    trained_score = final_score(test, run_rule(test, LSTMRule(trained), 100, TEST_SEED))
    untrained_score = final_score(test, run_rule(test, LSTMRule(untrained), 100, TEST_SEED))
    sgd_score = final_score(test, run_rule(test, BASELINES["SGD"](sgd_lr), 100, TEST_SEED))
    assert trained_score < untrained_score
    assert trained_score < sgd_score


def _save_untrained(trainer, tmp_path):
    from learnedopt import save_net

    return save_net(trainer.net, tmp_path / "untrained.pt")


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Ctrl-C inside an iteration's meta-step: the checkpoint holds the last finished iteration (a resume point,
    not the last periodic checkpoint), and the resumed run ends exactly where an uninterrupted one does."""
    from learnedopt.meta.runs import RunInterrupted

    config = tiny_config(checkpoint_every=100)
    full = MetaTrainer(QuadraticFamily(), config, tmp_path / "full", progress=False)
    full.train()

    calls = {"n": 0}
    original = MetaTrainer.meta_step

    def crashing(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(MetaTrainer, "meta_step", crashing)
    with pytest.raises(RunInterrupted, match="interrupted at iteration 2; continue with --resume"):
        MetaTrainer(QuadraticFamily(), config, tmp_path / "cut", progress=False).train()
    monkeypatch.setattr(MetaTrainer, "meta_step", original)
    resumed = MetaTrainer(QuadraticFamily(), config, tmp_path / "cut", resume=True, progress=False)
    assert resumed.iteration == 2  # checkpoint_every=100 alone would have left nothing to resume
    resumed.train()
    for (name, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name
    for index, state in full.meta_opt.state_dict()["state"].items():
        assert torch.equal(resumed.meta_opt.state_dict()["state"][index]["exp_avg_sq"], state["exp_avg_sq"])
    assert torch.equal(full.generator.get_state(), resumed.generator.get_state())
    assert full.selection.history == resumed.selection.history
    assert (tmp_path / "cut" / "net.pt").is_file()


def test_resume_with_other_settings_is_refused(tmp_path):
    MetaTrainer(QuadraticFamily(), tiny_config(iterations=1), tmp_path, progress=False).train()
    with pytest.raises(ValueError, match="horizon"):
        MetaTrainer(QuadraticFamily(), tiny_config(horizon=40), tmp_path, resume=True, progress=False)


def test_same_seed_same_net_other_seed_other_net(tmp_path):
    nets = [
        MetaTrainer(QuadraticFamily(), tiny_config(iterations=2, seed=s), tmp_path / f"{i}", progress=False).train()
        for i, s in enumerate((0, 0, 1))
    ]
    p = [torch.cat([t.reshape(-1) for t in n.state_dict().values()]) for n in nets]
    assert torch.equal(p[0], p[1]) and not torch.equal(p[0], p[2])


def test_gradient_checkpointing_trains_the_same_net(tmp_path):
    nets = [
        MetaTrainer(QuadraticFamily(), tiny_config(iterations=2, checkpoint=k), tmp_path / f"{k}", progress=False).train()
        for k in (0, 3)
    ]
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_configs_and_unknown_task():
    with pytest.raises(ValueError, match="multiple of unroll"):
        MetaTrainConfig(horizon=100, unroll=30)
    with pytest.raises(ValueError, match="estimator"):
        MetaTrainConfig(estimator="reinforce")
    with pytest.raises(ValueError, match="es_sigma"):
        MetaTrainConfig(estimator="es", es_sigma=0.0)
    with pytest.raises(ValueError, match="quadratic"):
        get_family("nope")


def test_quadratic_family_matches_its_definition():
    task = QuadraticFamily().sample(3, torch.Generator().manual_seed(0))
    theta = torch.randn(3, 10)
    expected = torch.stack([((task.W[i] @ theta[i] - task.y[i]) ** 2).sum() for i in range(3)])
    torch.testing.assert_close(task.loss({"theta": theta}), expected)
    # each task's gradient is its own: the batched loss does not average tasks
    theta.requires_grad_()
    (g,) = torch.autograd.grad(task.loss({"theta": theta}).sum(), theta)
    torch.testing.assert_close(g[1], 2 * task.W[1].T @ (task.W[1] @ theta[1] - task.y[1]))


def test_selection_runs_tuned_adam_once_and_scores_it_as_a_rerun_would(monkeypatch):
    from learnedopt import CoordinatewiseLSTM, LSTMConfig
    from learnedopt.meta import selection as selection_module
    from learnedopt.meta.selection import Selection

    config = tiny_config(eval_lengths=(20,))
    selection, net = Selection(QuadraticFamily(), config), CoordinatewiseLSTM(LSTMConfig(hidden_size=4))
    first = selection.evaluate(net)  # tunes Adam: its grid runs here
    calls = {"n": 0}
    original = selection_module.run_rule

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(selection_module, "run_rule", counting)
    assert selection.evaluate(net) == first and calls["n"] == 1  # the net's run only
    task = QuadraticFamily().sample(config.eval_tasks, torch.Generator().manual_seed(TUNE_SEED))
    lr = selection.adam_lrs["quadratic@20"]
    assert selection.adam_scores["quadratic@20"] == final_score(task, run_rule(task, BASELINES["Adam"](lr), 20, TUNE_SEED))
    old = {k: v for k, v in selection.state_dict().items() if k != "adam_scores"}  # a checkpoint from before
    resumed = Selection(QuadraticFamily(), config)
    resumed.load_state_dict(old)
    assert resumed.evaluate(net) == first and calls["n"] == 3  # the net, and Adam once to refill its score
