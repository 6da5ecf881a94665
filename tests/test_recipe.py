"""The generalization recipe: imitation warm start, horizon curriculum, objective rescaling, task mixtures."""

import torch

from learnedopt import CoordinatewiseLSTM, LSTMRule, MetaTrainConfig, MetaTrainer, Mixture, RescaledTask, adam
from learnedopt.meta.imitation import imitation_step, step_mismatch
from learnedopt_experiments.meta_train.tasks import QuadraticFamily


def test_imitation_reproduces_the_teachers_step_on_held_out_gradients():
    net = CoordinatewiseLSTM(inputs="normalized", output="adam", output_scale=1e-3, hidden_size=8)
    teacher = adam(5e-3)  # five times the net's nominal rate: the LSTM must learn to scale its steps
    family = QuadraticFamily()
    rule = LSTMRule(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    def held_out_error() -> float:
        task = family.sample(64, torch.Generator().manual_seed(123))
        theta = task.init_params(torch.Generator().manual_seed(5))["theta"]
        t_state, s_state, errors = teacher.init([theta]), rule.init([theta]), []
        with torch.no_grad():
            for step in range(30):
                with torch.enable_grad():
                    leaf = theta.requires_grad_()
                    (g,) = torch.autograd.grad(task.loss({"theta": leaf}).sum(), leaf)
                theta = theta.detach()
                (target,), t_state = teacher.update([g], t_state, [theta])
                (ours,), s_state = rule.update([g], s_state, [theta])
                errors.append(float(step_mismatch(ours, target)))
                theta = theta + target
        return sum(errors) / len(errors)

    before = held_out_error()
    for _ in range(60):
        imitation_step(rule, teacher, family.sample(32, generator), 30, 10, opt, generator)
    after = held_out_error()
    assert before > 0.5  # untrained: Adam at a fifth of the teacher's rate, relative error (1 - 1/5)^2 = 0.64
    assert after < 0.01, after  # within 10% of the teacher's step (relative root-mean-square error)


def test_short_curriculum_moves_to_the_next_stage(tmp_path):
    config = MetaTrainConfig(
        iterations=6, horizon=10, unroll=10, curriculum=(20,), patience=1, meta_batch=8, eval_every=1,
        eval_tasks=8, eval_lengths=(10,), meta_lr=1e-9,  # no learning: every evaluation after the first is stale
    )
    trainer = MetaTrainer(QuadraticFamily(), config, tmp_path, progress=False)
    trainer.train()
    horizons = [h["horizon"] for h in trainer.selection.history]
    assert horizons[0] == 10 and horizons[-1] == 20 and trainer.selection.stage == 1
    resumed = MetaTrainer(QuadraticFamily(), config, tmp_path, resume=True, progress=False)
    assert resumed.selection.stage == 1 and resumed.selection.horizon == 20


def test_imitation_warm_start_runs_before_meta_training_and_resumes(tmp_path):
    config = MetaTrainConfig(iterations=1, horizon=10, unroll=10, meta_batch=4, eval_tasks=4, imitation=2)
    trainer = MetaTrainer(QuadraticFamily(), config, tmp_path, progress=False)
    start = [p.detach().clone() for p in trainer.net.parameters()]
    trainer.train()
    assert trainer.imitated == 2 and trainer.iteration == 1
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.net.parameters()))
    assert MetaTrainer(QuadraticFamily(), config, tmp_path, resume=True, progress=False).imitated == 2


def test_rescaled_task_has_the_same_losses_and_rescaled_gradients():
    task = QuadraticFamily().sample(3, torch.Generator().manual_seed(0))
    wrapped = RescaledTask(task, log_range=3.0)
    scaled = wrapped.init_params(torch.Generator().manual_seed(1))
    original = task.init_params(torch.Generator().manual_seed(1))
    c = wrapped.scales["theta"]
    assert c.min() < 0.2 and c.max() > 5  # a wide range of per-coordinate scales
    torch.testing.assert_close(wrapped.loss(scaled, None), task.loss(original))
    x = original["theta"].clone().requires_grad_()
    y = (original["theta"] / c).requires_grad_()
    (gx,) = torch.autograd.grad(task.loss({"theta": x}).sum(), x)
    (gy,) = torch.autograd.grad(wrapped.loss({"theta": y}, None).sum(), y)
    torch.testing.assert_close(gy, gx * c)  # d f(c y) / dy = c f'(c y)


def test_mixture_draws_every_member():
    mix = Mixture([QuadraticFamily(dim=2), QuadraticFamily(dim=3)], name="mix")
    generator = torch.Generator().manual_seed(0)
    dims = {mix.sample(1, generator).y.shape[-1] for _ in range(20)}
    assert dims == {2, 3}
