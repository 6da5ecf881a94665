"""Few-shot pieces on the shared engine: episodes, ProtoNet's loss, MAML's meta-gradients."""

from pathlib import Path

import pytest
import torch
from torch import nn

from learnedopt_experiments.baselines.episodes import Episode, EpisodeSampler, sample_sinusoids
from learnedopt_experiments.baselines.batched import task_batched_loss
from learnedopt_experiments.baselines.maml import adapt, adapt_batched, maml_step, query_accuracy
from learnedopt_experiments.baselines.models import conv4, sinusoid_mlp
from learnedopt_experiments.baselines.protonet import episode_accuracy, episode_loss, prototype_logits

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_omniglot = pytest.mark.skipif(not (SHARED / "omniglot-py").is_dir(), reason="needs ../shared/data/omniglot-py")


@pytest.fixture(scope="module")
def omniglot():
    from learnedopt_experiments.baselines.omniglot import load_omniglot

    return load_omniglot()


@needs_omniglot
def test_omniglot_and_the_vinyals_splits(omniglot):
    assert omniglot.images.shape == (1623, 20, 28, 28)
    splits = {name: omniglot.split(name) for name in ("train", "val", "test")}
    assert [len(s) for s in splits.values()] == [4112, 688, 1692]
    characters = {name: {c for c, _ in s} for name, s in splits.items()}
    assert not (characters["train"] & characters["val"]) and not (characters["train"] & characters["test"])
    assert not (characters["val"] & characters["test"])


@needs_omniglot
def test_episode_sampler(omniglot):
    sampler = EpisodeSampler(omniglot, "test", ways=5, shots=2, queries=3)
    a = sampler.sample(torch.Generator().manual_seed(0))
    b = sampler.sample(torch.Generator().manual_seed(0))
    c = sampler.sample(torch.Generator().manual_seed(1))
    assert a.support_x.shape == (10, 1, 28, 28) and a.query_x.shape == (15, 1, 28, 28)
    assert torch.equal(torch.bincount(a.support_y), torch.full((5,), 2))
    assert torch.equal(torch.bincount(a.query_y), torch.full((5,), 3))
    assert torch.equal(a.support_x, b.support_x) and not torch.equal(a.support_x, c.support_x)
    # support and query images of a class are different drawings
    for k in range(5):
        s, q = a.support_x[a.support_y == k], a.query_x[a.query_y == k]
        assert all(not torch.equal(x, y) for x in s for y in q)
    with pytest.raises(ValueError, match="exceeds"):
        EpisodeSampler(omniglot, "test", ways=5, shots=10, queries=11)


def test_prototype_logits_by_hand():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1])  # prototypes (1, 0) and (0, 4)
    query = torch.tensor([[1.0, 1.0]])
    logits = prototype_logits(support, labels, query, 2)
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -10.0]]))
    episode = Episode(support, labels, query, torch.tensor([1]))
    out = episode_loss(nn.Identity(), {}, episode)
    expected = -torch.log_softmax(torch.tensor([-1.0, -10.0]), 0)[1]
    torch.testing.assert_close(out.meta_loss, expected)


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


def _fd(fn, params, direction, eps=1e-6):
    def shifted(sign):
        offset, moved = 0, {}
        for k, v in params.items():
            moved[k] = v.detach() + sign * eps * direction[offset : offset + v.numel()].view_as(v)
            offset += v.numel()
        return fn(moved)

    return (shifted(1) - shifted(-1)) / (2 * eps)


@pytest.mark.parametrize("kind", ["mlp", "conv4-batchnorm"])
def test_maml_meta_gradient_matches_finite_differences(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = sinusoid_mlp(8).double()
        episode = sample_sinusoids(5, 5, torch.Generator().manual_seed(0))
        episode = Episode(*(t.double() for t in (episode.support_x, episode.support_y, episode.query_x, episode.query_y)))
        criterion, lr = nn.functional.mse_loss, 0.05
    else:
        model = conv4(3, channels=3).double()
        x = torch.rand(12, 1, 28, 28, dtype=torch.float64)
        y = torch.tensor([0, 1, 2] * 4)
        episode, criterion, lr = Episode(x[:6], y[:6], x[6:], y[6:]), nn.functional.cross_entropy, 0.3
    params = dict(model.named_parameters())

    def meta_loss(p):
        with torch.no_grad():
            return adapt(model, p, episode, 2, lr, criterion).meta_loss.item()

    grad = _flat_grad(adapt(model, params, episode, 2, lr, criterion).meta_loss, params)
    for seed in range(2):
        v = torch.randn(grad.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert float(grad @ v) == pytest.approx(_fd(meta_loss, params, v), rel=1e-6, abs=1e-10)


def _conv_episodes(tasks, ways=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    y = torch.arange(ways).repeat(2)
    return [Episode(torch.rand(2 * ways, 1, 28, 28, generator=g, dtype=dtype), y,
                    torch.rand(2 * ways, 1, 28, 28, generator=g, dtype=dtype), y) for _ in range(tasks)]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("strided", [True, False])
def test_task_batched_maml_equals_the_loop_through_batchnorm(first_order, strided):
    """The shipped batching path (grouped convolutions, per-task BatchNorm) gives the loop's meta-gradient."""
    torch.manual_seed(0)
    model = conv4(3, channels=4, strided=strided).double()
    episodes = _conv_episodes(4)
    params = dict(model.named_parameters())
    loop = sum(adapt(model, params, e, 2, 0.3, first_order=first_order).meta_loss for e in episodes) / 4
    batched = adapt_batched(model, params, episodes, 2, 0.3, first_order=first_order).meta_loss
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=0)
    torch.testing.assert_close(_flat_grad(batched, params), _flat_grad(loop, params), rtol=1e-9, atol=1e-12)


def test_task_batched_maml_matches_finite_differences():
    torch.manual_seed(0)
    model = conv4(3, channels=3, strided=True).double()
    episodes = _conv_episodes(3)
    params = dict(model.named_parameters())

    def meta_loss(p):
        with torch.no_grad():
            return adapt_batched(model, p, episodes, 2, 0.3).meta_loss.item()

    grad = _flat_grad(adapt_batched(model, params, episodes, 2, 0.3).meta_loss, params)
    v = torch.randn(grad.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(grad @ v) == pytest.approx(_fd(meta_loss, params, v), rel=1e-6, abs=1e-10)


def test_task_batching_refuses_other_models():
    with pytest.raises(TypeError, match="Conv-4"):
        adapt_batched(sinusoid_mlp(), dict(sinusoid_mlp().named_parameters()), [], 1, 0.1)
    with pytest.raises(TypeError, match="per-task loop"):
        task_batched_loss(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))


def test_maml_matches_higher():
    higher = pytest.importorskip("higher")
    torch.manual_seed(0)
    model = conv4(3, channels=3).double()
    x = torch.rand(12, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([0, 1, 2] * 4)
    episode = Episode(x[:6], y[:6], x[6:], y[6:])
    params = dict(model.named_parameters())
    ours = _flat_grad(adapt(model, params, episode, 3, 0.3).meta_loss, params)

    inner = torch.optim.SGD(model.parameters(), lr=0.3)
    with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(nn.functional.cross_entropy(fmodel(episode.support_x), episode.support_y))
        query = nn.functional.cross_entropy(fmodel(episode.query_x), episode.query_y)
        theirs = _flat_grad(query, params)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_first_order_maml_is_the_query_gradient_at_the_adapted_params():
    torch.manual_seed(0)
    model = sinusoid_mlp(8).double()
    ep = sample_sinusoids(5, 5, torch.Generator().manual_seed(1))
    ep = Episode(*(t.double() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))
    params = dict(model.named_parameters())
    out = adapt(model, params, ep, 3, 0.05, nn.functional.mse_loss, first_order=True)
    fomaml = _flat_grad(out.meta_loss, params)
    adapted = {k: v.detach().requires_grad_() for k, v in out.params.items()}
    query = nn.functional.mse_loss(torch.func.functional_call(model, adapted, (ep.query_x,)), ep.query_y)
    torch.testing.assert_close(fomaml, _flat_grad(query, adapted))
    second = _flat_grad(adapt(model, params, ep, 3, 0.05, nn.functional.mse_loss).meta_loss, params)
    assert not torch.allclose(fomaml, second)


@needs_omniglot
def test_short_protonet_and_maml_training_beat_chance(omniglot):
    torch.manual_seed(0)
    train = EpisodeSampler(omniglot, "train", 20, 1, 5)
    test = EpisodeSampler(omniglot, "test", 5, 1, 15)
    g, gt = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    embed = conv4(None, channels=32)
    opt = torch.optim.Adam(embed.parameters(), 1e-3)
    for _ in range(60):
        opt.zero_grad()
        episode_loss(embed, dict(embed.named_parameters()), train.sample(g)).meta_loss.backward()
        opt.step()
    proto = sum(episode_accuracy(embed, test.sample(gt)) for _ in range(30)) / 30
    assert proto >= 0.6

    model = conv4(5, channels=32, strided=True)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    maml_train = EpisodeSampler(omniglot, "train", 5, 1, 5)
    for _ in range(100):
        maml_step(model, opt, [maml_train.sample(g) for _ in range(4)], 1, 0.4)
    maml = sum(query_accuracy(model, test.sample(gt), 3, 0.4) for _ in range(30)) / 30
    assert maml >= 0.4  # chance is 0.2


@needs_omniglot
def test_fewshot_cli_train_resume_eval_and_mismatch(tmp_path, capsys, omniglot):
    from learnedopt_cli import main

    out = tmp_path / "maml"
    def args(iterations):
        return ["maml", "train", "--out", str(out), "--iterations", str(iterations), "--meta-batch", "2",
                "--channels", "4", "--eval-every", "1", "--no-progress"]

    assert main(args(2)) == 0 and (out / "checkpoint.pt").is_file() and any((out / "tb").iterdir())
    assert main(args(4) + ["--resume"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and len(ckpt["history"]) == 4
    assert main(["maml", "eval", "--checkpoint", str(out / "checkpoint.pt"), "--episodes", "3"]) == 0
    assert "5-way 1-shot: query accuracy" in capsys.readouterr().out
    assert main(["maml", "eval", "--checkpoint", str(out / "checkpoint.pt"), "--ways", "20", "--episodes", "1"]) == 2
    assert "5-way MAML classifier" in capsys.readouterr().err
    assert main(["maml", "train", "--out", str(out), "--ways", "20", "--channels", "4", "--resume",
                 "--no-progress"]) == 2
    assert "ways: checkpoint 5, asked 20" in capsys.readouterr().err


def test_maml_with_the_learned_lstm_inner_rule_meta_trains_both(tmp_path, capsys):
    """The meta-learner-LSTM variant: the inner loop is LSTMRule, and its weights are meta-trained too."""
    from learnedopt import DEFAULT_NET, load_net
    from learnedopt_cli import main

    out = tmp_path / "sine-lstm"
    assert main(["maml", "train", "--dataset", "sinusoid", "--shots", "5", "--meta-batch", "4", "--iterations", "3",
                 "--inner-rule", "lstm", "--eval-every", "3", "--out", str(out), "--no-progress"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    start = load_net(DEFAULT_NET).state_dict()
    assert any(not torch.equal(ckpt["inner_net"][k], v) for k, v in start.items())  # the rule was meta-trained
    assert main(["maml", "eval", "--checkpoint", str(out / "checkpoint.pt"), "--shots", "5", "--episodes", "3"]) == 0
    assert "query mse" in capsys.readouterr().out
    assert main(["maml", "train", "--dataset", "sinusoid", "--shots", "5", "--out", str(out), "--resume",
                 "--no-progress"]) == 2  # resuming as plain MAML is refused
    assert "inner_rule: checkpoint 'lstm', asked 'sgd'" in capsys.readouterr().err


def _fake_omniglot(root, drawings):
    from PIL import Image

    for part in ("images_background", "images_evaluation"):
        folder = root / "omniglot-py" / part / "Alphabet" / "character01"
        folder.mkdir(parents=True)
        for i in range(drawings):
            Image.new("L", (105, 105), color=255 - i).save(folder / f"{i:02d}.png")


def test_omniglot_refuses_characters_with_too_few_drawings(tmp_path, monkeypatch):
    import learnedopt_experiments.baselines.omniglot as data

    monkeypatch.setattr(data, "CACHE_ROOT", tmp_path / "cache")
    _fake_omniglot(tmp_path / "short", 19)
    with pytest.raises(data.DataNotFoundError, match="need 20 drawings"):
        data.load_omniglot(tmp_path / "short")


def test_omniglot_cache_is_keyed_by_root_and_contents(tmp_path, monkeypatch):
    import learnedopt_experiments.baselines.omniglot as data

    monkeypatch.setattr(data, "CACHE_ROOT", tmp_path / "cache")
    _fake_omniglot(tmp_path / "a", 20)
    _fake_omniglot(tmp_path / "b", 20)
    first = data.load_omniglot(tmp_path / "a").images.clone()
    from PIL import Image

    png = tmp_path / "b" / "omniglot-py" / "images_background" / "Alphabet" / "character01" / "00.png"
    Image.new("L", (105, 105), color=0).save(png)  # same names, other contents, other root
    second = data.load_omniglot(tmp_path / "b").images
    assert not torch.equal(first, second)


def test_omniglot_cache_survives_two_runs_building_it_at_once(tmp_path, monkeypatch):
    """Two runs started together both build the cache; the one that finishes second must not fail."""
    import learnedopt_experiments.baselines.omniglot as data

    monkeypatch.setattr(data, "CACHE_ROOT", tmp_path / "cache")
    _fake_omniglot(tmp_path / "a", 20)
    save, nested = torch.save, []

    def save_while_another_run_builds(obj, f):
        save(obj, f)
        if not nested:  # the other run builds and writes its cache before this one has moved its own in place
            nested.append(None)
            nested[0] = data.load_omniglot(tmp_path / "a")

    monkeypatch.setattr(data.torch, "save", save_while_another_run_builds)
    first = data.load_omniglot(tmp_path / "a")
    assert torch.equal(first.images, nested[0].images)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["omniglot-28.pt"]


def test_public_checkpoint_loader_and_eval_defaults_to_its_own_inner_steps():
    from learnedopt_experiments.baselines import evaluate, load_checkpoint

    path = Path(__file__).resolve().parents[1] / "results" / "checkpoints" / "maml-sinusoid-5shot.pt"
    model, config, inner_net = load_checkpoint(path)
    assert config.algorithm == "maml" and isinstance(model, torch.nn.Module) and inner_net is None
    own = evaluate(path, 1, 5, 20, inner_steps=None)
    explicit = evaluate(path, 1, 5, 20, inner_steps=config.inner_steps)
    other = evaluate(path, 1, 5, 20, inner_steps=config.inner_steps + 4)
    assert own == explicit and own != other


def test_query_batch_sets_the_batchnorm_batch_of_the_query_set():
    torch.manual_seed(0)
    model = conv4(5, channels=8)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(3)
    episode = Episode(torch.rand(5, 1, 28, 28, generator=g), torch.arange(5),
                      torch.rand(15, 1, 28, 28, generator=g), labels)
    together = query_accuracy(model, episode, 1, 0.4)
    assert query_accuracy(model, episode, 1, 0.4, query_batch=15) == together
    per_image = [query_accuracy(model, episode, 1, 0.4, query_batch=k) for k in (1, 5)]
    assert len({together, *per_image}) > 1  # BatchNorm on batch statistics: the batch changes the predictions


def test_matching_network_attends_over_the_support_set():
    """Probabilities sum to one; a query identical to a support image of a 1-shot episode takes its class
    (its cosine similarity, 1, is the largest); with FCE, gradients reach both LSTMs."""
    from learnedopt_experiments.baselines.matching import MatchingNetwork, episode_loss

    torch.manual_seed(0)
    support, labels = torch.randn(5, 1, 28, 28), torch.tensor([3, 0, 4, 1, 2])
    order = torch.tensor([2, 0, 4, 1, 3])
    net = MatchingNetwork(channels=8)
    log_p = net(support, labels, support[order])
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(5))
    assert torch.equal(log_p.argmax(-1), labels[order])
    with torch.no_grad():  # unscaled cosines cap a 5-way attention at e / (e + 4 / e) ~ 0.65; the scale lifts it
        net.log_scale.fill_(torch.tensor(1000.0).log())
    assert net(support, labels, support[order]).exp().max(-1).values.min() > 0.99
    fce = MatchingNetwork(channels=8, fce=True, processing_steps=3)
    episode = Episode(support, labels, support[order], labels[order])
    episode_loss(fce, dict(fce.named_parameters()), episode).meta_loss.backward()
    for module in (fce.support_lstm, fce.query_cell, fce.embed):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert fce.log_scale.grad is not None and fce.log_scale.grad != 0


@needs_omniglot
@pytest.mark.parametrize("fce", [False, True])
def test_short_matching_network_training_beats_chance(omniglot, fce):
    from learnedopt_experiments.baselines.matching import MatchingNetwork
    from learnedopt_experiments.baselines.matching import episode_accuracy as matching_accuracy
    from learnedopt_experiments.baselines.matching import episode_loss as matching_loss

    torch.manual_seed(0)
    train, test = EpisodeSampler(omniglot, "train", 5, 1, 5), EpisodeSampler(omniglot, "test", 5, 1, 15)
    g, gt = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    net = MatchingNetwork(32, fce=fce)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(60):
        opt.zero_grad()
        matching_loss(net, dict(net.named_parameters()), train.sample(g)).meta_loss.backward()
        opt.step()
    assert sum(matching_accuracy(net, test.sample(gt)) for _ in range(30)) / 30 >= 0.5  # chance is 0.2


@needs_omniglot
def test_matching_cli_trains_and_evaluates(tmp_path, capsys):
    from learnedopt_cli import main

    out = tmp_path / "matching"
    assert main(["matching", "train", "--out", str(out), "--iterations", "2", "--channels", "4", "--fce",
                 "--eval-every", "1", "--no-progress"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["fewshot_config"]["algorithm"] == "matching" and ckpt["fewshot_config"]["fce"] is True
    assert main(["matching", "eval", "--checkpoint", str(out / "checkpoint.pt"), "--episodes", "3"]) == 0
    assert "matching 5-way 1-shot: query accuracy" in capsys.readouterr().out
    assert main(["matching", "train", "--out", str(out), "--channels", "4", "--resume", "--no-progress"]) == 2
    assert "fce: checkpoint True, asked False" in capsys.readouterr().err


def test_meta_learner_lstm_is_the_gated_cell_state_update():
    """theta_t = f * theta - i * grad with i, f from the gates; the loss is an input; per-task losses reach their
    own task's coordinates."""
    from learnedopt import unroll
    from learnedopt_experiments.baselines.meta_learner import MetaLearnerLSTM, MetaLearnerRule

    torch.manual_seed(0)
    net = MetaLearnerLSTM(hidden_size=6)
    rule = MetaLearnerRule(net)
    theta, grad = torch.randn(2, 5), torch.randn(2, 5)
    with torch.no_grad():  # gates that ignore the first LSTM: i = sigmoid(b_I), f = sigmoid(b_F)
        for gate in (net.input_gate, net.forget_gate):
            gate.weight.zero_()
    (update,), _ = rule.update([grad], rule.init([theta]), [theta], loss=torch.tensor(1.0))
    i, f = torch.sigmoid(net.input_gate.bias), torch.sigmoid(net.forget_gate.bias)
    torch.testing.assert_close(update, (f - 1) * theta - i * grad)
    assert 0 < float(i.detach()) < 0.02 and float(f.detach()) > 0.98  # Ravi & Larochelle's initial biases

    with torch.no_grad():
        net.input_gate.weight.normal_(0, 1.0)  # now the gates read the first LSTM, which reads the loss
    state = rule.init([theta])
    low = rule.update([grad], state, [theta], loss=torch.tensor(0.1))[0][0]
    high = rule.update([grad], state, [theta], loss=torch.tensor(10.0))[0][0]
    assert not torch.allclose(low, high)
    per_task = rule.update([grad], state, [theta], loss=torch.tensor([0.1, 10.0]))[0][0]
    torch.testing.assert_close(per_task[0], low[0])
    torch.testing.assert_close(per_task[1], high[1])
    # the unroll engine hands every step's loss to the rule; the first-order meta-gradient reaches every weight
    # of the meta-learner and the learner's initialization (the cell state it starts from)
    start = {"x": torch.ones(3, requires_grad=True)}
    out = unroll(lambda p, _: (p["x"] ** 2).sum(), start, rule, None, 3, lambda t: None)
    out.meta_loss.backward()
    assert start["x"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with pytest.raises(ValueError, match="needs each step's loss"):
        rule.update([grad], state, [theta])


def test_meta_learner_lstm_meta_trains_with_the_initialization(tmp_path, capsys):
    from learnedopt_cli import main

    out = tmp_path / "meta-lstm"
    assert main(["maml", "train", "--dataset", "sinusoid", "--shots", "5", "--inner-rule", "meta-lstm",
                 "--first-order", "--inner-steps", "3", "--iterations", "3", "--meta-batch", "4", "--out", str(out),
                 "--eval-every", "3", "--no-progress"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    from learnedopt_experiments.baselines.meta_learner import MetaLearnerLSTM

    assert ckpt["fewshot_config"]["inner_rule"] == "meta-lstm" and ckpt["iteration"] == 3
    assert set(ckpt["inner_net"]) == set(MetaLearnerLSTM().state_dict())
    assert main(["maml", "eval", "--checkpoint", str(out / "checkpoint.pt"), "--shots", "5", "--episodes", "3"]) == 0
    assert "5-shot sinusoid: query mse" in capsys.readouterr().out
