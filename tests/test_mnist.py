"""MNIST data, the data-root resolution order, and MNIST workloads."""

from pathlib import Path

import pytest
import torch
from torch import nn

import learnedopt
from learnedopt_experiments.data import DataNotFoundError, candidate_roots, resolve_data_root
from learnedopt.meta.evaluation import TUNE_SEED, tune_lr
from learnedopt_experiments.meta_train.mnist import MNISTFamily, load_mnist, mnist_model

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason="needs ../shared/data/MNIST")


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


@needs_mnist
def test_mnist_loads_with_expected_sizes_and_normalization(mnist):
    assert mnist.train_images.shape == (60000, 1, 28, 28) and mnist.test_images.shape == (10000, 1, 28, 28)
    assert mnist.train_labels.shape == (60000,) and set(mnist.test_labels.unique().tolist()) == set(range(10))
    assert abs(float(mnist.train_images.mean())) < 0.01 and abs(float(mnist.train_images.std()) - 1) < 0.01
    assert float(mnist.train_images.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_data_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("LEARNEDOPT_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"  # --data-dir beats the variable
    assert resolve_data_root() == tmp_path / "env"  # the variable beats ../shared/data
    monkeypatch.delenv("LEARNEDOPT_DATA")
    roots = [origin for _, origin in candidate_roots()]
    assert roots[-1] == "default cache"
    if SHARED.is_dir():
        assert roots[0] == "../shared/data" and resolve_data_root() == SHARED.resolve()


def test_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_mnist(tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "--data-dir" in message and "LEARNEDOPT_DATA" in message


def test_missing_data_from_the_cli_is_an_error_line(tmp_path, capsys):
    from learnedopt_cli import main

    code = main(["benchmark", "--task", "mnist-mlp", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    assert code == 2 and "MNIST not found" in capsys.readouterr().err


@needs_mnist
def test_functional_loss_equals_module_loss():
    task = MNISTFamily("mnist-mlp").sample(3, torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(1))
    images, labels = task.batch(5)
    losses = task.loss(params, (images, labels))
    for i in range(3):
        model = mnist_model("mnist-mlp")
        model.load_state_dict({k: v[i] for k, v in params.items()})
        expected = nn.functional.cross_entropy(model(images[i]), labels[i])
        torch.testing.assert_close(losses[i], expected)
    assert isinstance(model[2], nn.Sigmoid) and model[1].out_features == 20  # the paper's MLP


@needs_mnist
def test_tasks_differ_by_init_and_batches_but_are_reproducible():
    family = MNISTFamily("mnist-conv")
    a = family.sample(2, torch.Generator().manual_seed(0))
    b = family.sample(2, torch.Generator().manual_seed(0))
    pa, pb = a.init_params(torch.Generator().manual_seed(3)), b.init_params(torch.Generator().manual_seed(3))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["0.weight"][0], pa["0.weight"][1])
    assert torch.equal(a.batch(7)[1], b.batch(7)[1]) and not torch.equal(a.batch(7)[1], a.batch(8)[1])


class _Recorder:
    """A fake task whose loss is known in closed form; it records which init seeds it was run with."""

    num_tasks = 4
    device = torch.device("cpu")

    def __init__(self):
        self.seeds = []

    def init_params(self, generator):
        self.seeds.append(generator.initial_seed())
        return {"x": torch.full((4,), 3.0)}

    def loss(self, params, batch):
        return params["x"] ** 2

    def batch(self, step):
        return None


def test_lr_tuner_picks_the_argmin_and_only_uses_tuning_seeds():
    task = _Recorder()
    # SGD on x^2 with lr 0.5 lands on the minimum in one step; every other grid value is worse
    best, scores = tune_lr(task, lambda lr: learnedopt.sgd(lr), steps=3, grid=[0.01, 0.1, 0.5, 0.9])
    assert best == 0.5 and scores[0.5] == 0.0 and scores[0.01] > scores[0.1] > 0
    assert set(task.seeds) == {TUNE_SEED}


@needs_mnist
def test_short_mnist_meta_training_lowers_held_out_meta_loss(tmp_path):
    from learnedopt import LSTMRule, MetaTrainConfig, MetaTrainer, unroll

    config = MetaTrainConfig(task="mnist-mlp", iterations=8, horizon=20, unroll=10, meta_batch=2, meta_lr=1e-2,
                             objective="sum", eval_every=100, eval_tasks=2, eval_lengths=(20,), seed=0)
    trainer = MetaTrainer(MNISTFamily("mnist-mlp"), config, tmp_path, progress=False)
    held_out = trainer.family.sample(4, torch.Generator().manual_seed(TUNE_SEED))

    def meta_loss(net):
        params = held_out.init_params(torch.Generator().manual_seed(TUNE_SEED))
        with torch.no_grad():
            return unroll(held_out.loss, params, LSTMRule(net), None, 20, held_out.batch).meta_loss.item()

    before = meta_loss(trainer.net)
    trainer.train()
    assert meta_loss(trainer.net) < 0.9 * before


@needs_mnist
def test_default_learned_optimizer_trains_an_mnist_mlp(mnist):
    torch.manual_seed(0)
    model = mnist_model("mnist-mlp")
    opt = learnedopt.LearnedOptimizer(model.parameters())
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        index = torch.randint(0, 60000, (128,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(mnist.train_images[index]), mnist.train_labels[index])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_mnist
def test_runs_are_scored_on_a_fixed_evaluation_set_not_the_last_minibatch():
    from learnedopt.meta.evaluation import final_losses, run_rule

    task = MNISTFamily("mnist-mlp").sample(3, torch.Generator().manual_seed(0))
    result = run_rule(task, learnedopt.adam(1e-2), 5, init_seed=1)
    scored = final_losses(task, result)
    model = mnist_model("mnist-mlp")
    index = torch.randperm(60000, generator=torch.Generator().manual_seed(0))[:10_000]
    for i in range(3):
        torch.nn.utils.vector_to_parameters(
            torch.cat([result.params[k][i].flatten() for k, _ in model.named_parameters()]), model.parameters()
        )
        with torch.no_grad():
            expected = nn.functional.cross_entropy(model(task.family.inputs[index]), task.family.targets[index])
        assert float(scored[i]) == pytest.approx(float(expected), rel=1e-5)
    assert not torch.allclose(scored, result.losses[-1].double())  # not the last minibatch's loss
