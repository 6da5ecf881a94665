"""Your own model and data: ModuleFamily, learnedopt.meta_train and `learnedopt meta-train --task module:factory`."""

import textwrap

import pytest
import torch
from torch import nn

import learnedopt
from learnedopt import LearnedOptimizer, ModuleFamily, load_net
from learnedopt_cli import main
from learnedopt_experiments.meta_train.tasks import family_from_path

SETTINGS = dict(iterations=4, horizon=20, unroll=10, meta_batch=4, eval_every=2, eval_tasks=4, checkpoint_every=1)


def synthetic(n=512, features=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, (x @ torch.randn(features, classes, generator=g)).argmax(-1)


def tiny_mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def family(**options):
    return ModuleFamily(tiny_mlp, synthetic(), nn.functional.cross_entropy, batch_size=32, name="tiny", **options)


def test_tasks_are_fresh_initializations_and_minibatch_orders():
    task = family().sample(3, torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(1))
    assert set(params) == {"0.weight", "0.bias", "2.weight", "2.bias"} and params["0.weight"].shape == (3, 16, 8)
    assert not torch.equal(params["0.weight"][0], params["0.weight"][1])  # each copy its own initialization
    x0, _ = task.batch(0)
    assert x0.shape == (3, 32, 8) and not torch.equal(x0[0], x0[1])  # and its own minibatches
    assert torch.equal(task.batch(5)[0], task.batch(5)[0])  # a pure function of the step
    again = family().sample(3, torch.Generator().manual_seed(0)).init_params(torch.Generator().manual_seed(1))
    assert all(torch.equal(params[k], again[k]) for k in params)  # and of the seeds


def test_each_copy_loss_is_the_model_loss_and_vmap_equals_the_loop():
    batched, looped = family(), family(batched=False)
    assert batched.batched and not looped.batched
    task = batched.sample(3, torch.Generator().manual_seed(0))
    params = {k: v.requires_grad_() for k, v in task.init_params(torch.Generator().manual_seed(1)).items()}
    x, y = task.batch(0)
    losses = task.loss(params, (x, y))
    model = tiny_mlp()
    for i in range(3):
        torch.nn.utils.vector_to_parameters(torch.cat([params[k][i].flatten() for k, _ in model.named_parameters()]),
                                            model.parameters())
        assert float(losses[i].detach()) == pytest.approx(nn.functional.cross_entropy(model(x[i]), y[i]).item(), rel=1e-6)
    grads = torch.autograd.grad(losses.sum(), list(params.values()))
    loop_losses = looped.losses(params, x, y)
    loop_grads = torch.autograd.grad(loop_losses.sum(), list(params.values()))
    torch.testing.assert_close(loop_losses, losses)
    for a, b in zip(grads, loop_grads):
        torch.testing.assert_close(a, b)


def test_models_vmap_cannot_run_fall_back_to_a_loop():
    class Branchy(nn.Module):  # data-dependent control flow: vmap refuses it
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 3)

        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else -self.linear(x)

    fam = ModuleFamily(Branchy, synthetic(), nn.functional.cross_entropy, 16)
    task = fam.sample(2, torch.Generator().manual_seed(0))
    assert not fam.batched
    assert task.loss(task.init_params(torch.Generator().manual_seed(0)), task.batch(0)).shape == (2,)


def test_module_templates_batchnorm_frozen_parameters_and_datasets():
    template = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    template[0].requires_grad_(False)  # frozen: held at the template's values, not optimized
    x, y = synthetic()
    fam = ModuleFamily(template, torch.utils.data.TensorDataset(x, y), nn.functional.cross_entropy, 16)
    assert fam.batched  # BatchNorm on batch statistics is vmappable
    task = fam.sample(2, torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(0))
    assert set(params) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert not torch.equal(params["3.weight"][0], params["3.weight"][1])  # re-initialized per copy
    assert task.eval_loss(params).shape == (2,)

    class Pairs(torch.utils.data.Dataset):  # any map-style dataset of (input, target) pairs
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i], int(y[i])

    gathered = ModuleFamily(tiny_mlp, Pairs(), nn.functional.cross_entropy, 16)
    assert torch.equal(gathered.inputs, x) and torch.equal(gathered.targets, y)


def test_unusable_models_and_losses_are_refused_with_a_reason():
    frozen = nn.Linear(8, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable floating-point parameters"):
        ModuleFamily(frozen, synthetic(), nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="one floating-point number per minibatch"):
        ModuleFamily(tiny_mlp, synthetic(), lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    with pytest.raises(TypeError, match="not an nn.Module"):
        ModuleFamily(lambda: "a model", synthetic(), nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="same, nonzero length"):
        ModuleFamily(tiny_mlp, (torch.randn(5, 8), torch.zeros(4, dtype=torch.long)), nn.functional.cross_entropy)


def test_meta_train_call_trains_resumes_bit_identically_and_its_net_drives_the_optimizer(tmp_path):
    net = learnedopt.meta_train(family(), tmp_path / "full", progress=False, **SETTINGS)
    assert (tmp_path / "full" / "net.pt").is_file() and (tmp_path / "full" / "tb").is_dir()
    cut = {**SETTINGS, "iterations": 2}
    learnedopt.meta_train(family(), tmp_path / "cut", progress=False, **cut)
    with pytest.raises(FileExistsError, match="already holds a run"):
        learnedopt.meta_train(family(), tmp_path / "cut", progress=False, **SETTINGS)
    learnedopt.meta_train(family(), tmp_path / "cut", resume=True, progress=False, **SETTINGS)
    full, resumed = load_net(tmp_path / "full" / "last.pt"), load_net(tmp_path / "cut" / "last.pt")
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert net.config == full.config

    model = tiny_mlp()
    opt = LearnedOptimizer(model.parameters(), net=str(tmp_path / "full" / "net.pt"))
    x, y = synthetic()
    before = nn.functional.cross_entropy(model(x), y).item()
    for step in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[step * 16 : step * 16 + 16]), y[step * 16 : step * 16 + 16]).backward()
        opt.step()
    assert nn.functional.cross_entropy(model(x), y).item() < before


def test_meta_train_call_names_unknown_settings_and_mismatched_devices():
    with pytest.raises(TypeError, match="unknown meta-training settings.*'horizn'"):
        learnedopt.meta_train(family(), "unused", horizn=20)
    with pytest.raises(ValueError, match="build the family with device='meta'"):
        learnedopt.meta_train(family(), "unused", device="meta")


FACTORIES = """
import torch
from torch import nn
from learnedopt import ModuleFamily

def make_family(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(-1)
    model = lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    return ModuleFamily(model, (x, y), nn.functional.cross_entropy, 32, name="cli-tiny", device=device)

def not_a_family():
    return 42

def frozen_model():
    return ModuleFamily(nn.Linear(8, 3).requires_grad_(False), (torch.randn(8, 8), torch.zeros(8).long()),
                        nn.functional.cross_entropy)

NUMBER = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    """A module of the user's own in the working directory, under a name unique to this test."""
    name = f"user_tasks_{request.node.name.removeprefix('test_')[:40]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def cli(*args):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    return main(["--threads", "1", "meta-train", *args, *flags, "--no-progress"])


def test_command_line_meta_trains_a_family_given_by_import_path_and_resumes_it(tmp_path, user_module):
    assert cli("--task", f"{user_module}:make_family", "--out", "full") == 0
    assert cli("--task", f"{user_module}:make_family", "--out", "cut", "--iterations", "2") == 0
    assert cli("--task", f"{user_module}:make_family", "--out", "cut", "--resume") == 0
    full, resumed = load_net(tmp_path / "full" / "last.pt"), load_net(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())
    assert load_net(tmp_path / "full" / "net.pt") is not None
    LearnedOptimizer(nn.Linear(8, 3).parameters(), net=str(tmp_path / "full" / "net.pt"))


@pytest.mark.parametrize(
    "target, message",
    [
        ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:NUMBER", "is a int, not a function"),
        ("{mod}:not_a_family", "returned a int, not a task family"),
        ("{mod}:frozen_model", "no trainable floating-point parameters"),
        ("{mod}:", "package.module:factory"),
    ],
)
def test_import_path_errors_are_one_line_and_say_what_is_wrong(user_module, capsys, target, message):
    assert cli("--task", target.format(mod=user_module), "--out", "run") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("learnedopt: error:") and "\n" not in err


def test_factories_receive_only_the_options_they_accept(user_module):
    fam = family_from_path(f"{user_module}:make_family", device="cpu", data_dir="/nowhere")
    assert fam.name == "cli-tiny" and fam.device == torch.device("cpu")


def test_fine_tuning_keeps_its_starting_net_when_training_only_makes_it_worse(tmp_path, monkeypatch):
    """With init_net the starting point is scored first, so a meta-training that ruins the net cannot ship it."""

    def ruinous_meta_step(self):
        with torch.no_grad():
            for p in self.net.parameters():
                p.zero_()
            self.net.head.bias.copy_(torch.tensor([-10.0, 10.0]))  # tiny Adam steps, a full-size blind drift
        return 0.0

    monkeypatch.setattr(learnedopt.MetaTrainer, "meta_step", ruinous_meta_step)
    learnedopt.meta_train(family(), tmp_path, progress=False, init_net=learnedopt.DEFAULT_NET,
                          **{**SETTINGS, "iterations": 2, "eval_every": 2})
    history = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]
    assert [h["iteration"] for h in history] == [0, 2] and history[1]["eval/score"] > history[0]["eval/score"]
    shipped, original = load_net(tmp_path / "net.pt"), load_net(learnedopt.DEFAULT_NET)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in shipped.state_dict().items())


def test_benchmark_command_takes_a_family_by_import_path_too(tmp_path, user_module):
    args = ["benchmark", "--task", f"{user_module}:make_family", "--net", learnedopt.DEFAULT_NET, "--steps", "5",
            "--tasks", "8", "--baselines", "Adam", "--out", str(tmp_path / "bench"), "--name", "mine"]
    assert main(["--threads", "1", *args]) == 0
    table = (tmp_path / "bench" / "mine.md").read_text()
    assert "Adam" in table and learnedopt.DEFAULT_NET in table


@pytest.mark.parametrize("name", ["seq-transformer", "seq-lstm", "mnist-resnet-bn"])
def test_the_broader_families_train_with_adam(name):
    """Issue 20's sequence models and residual BatchNorm net: tasks build, and 30 Adam steps lower the loss."""
    from learnedopt import adam, unroll
    from learnedopt_experiments.meta_train.tasks import get_family

    family = get_family(name)
    task = family.sample(2, torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = unroll(task.loss, params, adam(3e-3), None, 30, task.batch)
    before, after = task.loss(params, task.batch(0)), task.loss(out.params, task.batch(0))
    assert before.shape == (2,) and torch.isfinite(after).all() and (after < before).all()


def test_general_seq_adds_sequences_and_a_residual_net_to_general():
    from learnedopt_experiments.meta_train.tasks import GENERAL_MNIST, get_family

    names = [f.name for f in get_family("general-seq").components()]
    assert names == [*GENERAL_MNIST, "seq-transformer", "seq-lstm", "mnist-resnet-bn"]
