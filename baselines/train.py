"""Training and evaluation runs for MAML and ProtoNet: checkpoints, resume, TensorBoard, progress bars, seeds.

``learnedopt maml|protonet|matching train|eval`` call :func:`train` and :func:`evaluate`.
A checkpoint records the algorithm, dataset, N-way and architecture; evaluating or resuming it with other
settings fails with a message that says which.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from learnedopt import CoordinatewiseLSTM, LSTMRule, UpdateRule, load_net
from learnedopt.meta.runs import RunLoop
from learnedopt.pretrained import atomic_save, load_file

from .episodes import Episode, EpisodeSampler, sample_sinusoids
from .maml import adapt, maml_step, query_accuracy
from .matching import MatchingNetwork
from .meta_learner import MetaLearnerLSTM, MetaLearnerRule
from .models import conv4, sinusoid_mlp
from .omniglot import load_omniglot
from . import matching, protonet

__all__ = ["FewShotConfig", "train", "evaluate", "load_checkpoint", "inner_update"]

PAPER_NET = "mnist-lstm"
_MUST_MATCH = ("algorithm", "dataset", "ways", "channels", "strided", "inner_rule", "fce")
ALGORITHMS = ("maml", "protonet", "matching")
# the episode methods with no inner loop: their training loss and test accuracy on one episode
_EPISODIC = {"protonet": (protonet.episode_loss, protonet.episode_accuracy),
             "matching": (matching.episode_loss, matching.episode_accuracy)}


def _field(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


# per-algorithm defaults, the papers' (Finn et al. 2017 for MAML, Snell et al. 2017 for ProtoNet, Vinyals et al.
# 2016 for matching networks: training episodes of the test's N-way); a field left at its "unset" value takes them
_DEFAULTS: dict[str, dict[str, Any]] = {
    "maml": {"ways": 5, "iterations": 60000, "meta_batch": 32, "inner_steps": 1, "strided": True, "lr_halving": 0},
    "protonet": {"ways": 60, "iterations": 20000, "meta_batch": 1, "inner_steps": 0, "strided": False,
                 "lr_halving": 2000, "queries": 5, "inner_lr": 0.0},
    "matching": {"ways": 5, "iterations": 20000, "meta_batch": 1, "inner_steps": 0, "strided": False,
                 "lr_halving": 0, "queries": 5, "inner_lr": 0.0},
}


@dataclass
class FewShotConfig:
    """One few-shot run; every default of ``learnedopt maml|protonet train`` lives here (the flags are generated
    from these fields). Fields left unset take the algorithm's paper defaults (:data:`_DEFAULTS`): MAML on
    Omniglot 5-way with stride-2 convolutions; ProtoNet with 60-way training episodes, max-pooling and the
    learning rate halved every 2000 episodes.

    Example:
        >>> FewShotConfig(algorithm="protonet").ways, FewShotConfig(dataset="sinusoid").inner_lr
        (60, 0.01)
    """

    algorithm: str = "maml"  # "maml", "protonet" or "matching" (the command, not a flag)
    dataset: str = _field("omniglot", "MAML's dataset", choices=("omniglot", "sinusoid"), maml=True)
    ways: int = _field(0, "classes per training episode (0: 60 for ProtoNet, else 5; 1 for sinusoids)")
    shots: int = _field(1, "labelled examples per class")
    queries: int = _field(0, "query examples per class in training episodes (0: shots for MAML, else 5)")
    iterations: int = _field(0, "meta-iterations (0: 60000 for MAML, else 20000)")
    meta_batch: int = _field(0, "episodes per meta-update (0: 32)", maml=True)
    meta_lr: float = _field(1e-3, "Adam learning rate of the meta-optimizer")
    inner_steps: int = _field(-1, "inner SGD steps (-1: 1; 0: joint training, the 'pretrained' baseline of the MAML "
                              "paper)", maml=True)
    inner_lr: float = _field(0.0, "inner SGD learning rate (0: 0.4 on Omniglot, 0.01 on sinusoids)", maml=True)
    inner_rule: str = _field("sgd", "inner-loop optimizer: SGD (MAML); lstm: this package's coordinatewise LSTM "
                             "optimizer (from mnist-lstm); meta-lstm: Ravi & Larochelle's meta-learner LSTM (use "
                             "with --first-order, their approximation); both learned rules are meta-trained "
                             "with the initialization", choices=("sgd", "lstm", "meta-lstm"), maml=True)
    first_order: bool = _field(False, "first-order MAML (no second derivatives)", maml=True)
    channels: int = _field(64, "Conv-4 channels")
    fce: bool = _field(False, "matching networks: full-context embeddings (a bidirectional LSTM over the support "
                       "set, an attention LSTM for queries)", matching=True)
    processing_steps: int = _field(5, "matching networks with FCE: the attention LSTM's reading steps", matching=True)
    strided: bool | None = None  # Conv-4 with stride-2 convolutions (MAML's) instead of max-pooling (ProtoNet's)
    lr_halving: int = _field(-1, "halve the meta learning rate every N iterations (0: never; -1: the algorithm's: "
                             "2000 for ProtoNet, never for MAML and matching networks); may change on --resume")
    eval_every: int = _field(500, "validation period (iterations)")
    checkpoint_every: int = _field(500, "checkpoint period (iterations)")
    seed: int = _field(0, "seed of every random choice of the run")
    device: str = _field("cpu", "cpu, cuda, cuda:1, ...")
    data_dir: str | None = _field(None, "data root (default: $LEARNEDOPT_DATA, ../shared/data, cache)")

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        maml = self.algorithm == "maml"
        if self.dataset not in ("omniglot", "sinusoid") or (not maml and self.dataset != "omniglot"):
            raise ValueError(f"dataset {self.dataset!r} is not available for {self.algorithm}")
        if self.inner_rule not in ("sgd", "lstm", "meta-lstm") or (not maml and self.inner_rule != "sgd"):
            raise ValueError(f"inner rule {self.inner_rule!r} is not available for {self.algorithm}")
        if self.fce and self.algorithm != "matching":
            raise ValueError("fce (full-context embeddings) is a matching-network option")
        defaults = {"queries": self.shots, "inner_lr": 0.01 if self.dataset == "sinusoid" else 0.4,
                    **_DEFAULTS[self.algorithm], **({"ways": 1} if self.dataset == "sinusoid" else {})}
        for name, value in defaults.items():
            if getattr(self, name) == {"inner_steps": -1, "strided": None, "lr_halving": -1}.get(name, 0):
                setattr(self, name, value)
        if self.algorithm in _EPISODIC and (self.inner_steps or self.meta_batch != 1 or self.first_order):
            raise ValueError(f"{self.algorithm} has no inner loop and one episode per step: inner_steps, meta_batch "
                             "and first_order are MAML's")


def build_model(config: FewShotConfig) -> nn.Module:
    if config.dataset == "sinusoid":
        return sinusoid_mlp()
    if config.algorithm == "matching":
        return MatchingNetwork(config.channels, config.fce, config.processing_steps)
    ways = None if config.algorithm == "protonet" else config.ways
    return conv4(ways, config.channels, strided=bool(config.strided))


class _Tasks:
    """Episodes of the configured dataset and split."""

    def __init__(self, config: FewShotConfig, split: str, ways: int, shots: int, queries: int) -> None:
        self.config, self.shots, self.queries = config, shots, queries
        self.sampler = None
        if config.dataset == "omniglot":
            self.sampler = EpisodeSampler(load_omniglot(config.data_dir), split, ways, shots, queries)

    def sample(self, generator: torch.Generator) -> Episode:
        if self.sampler is None:
            episode = sample_sinusoids(self.shots, self.queries, generator)
        else:
            episode = self.sampler.sample(generator)
        return episode.to(self.config.device)


def _criterion(config: FewShotConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return nn.functional.mse_loss if config.dataset == "sinusoid" else nn.functional.cross_entropy


def _inner_net(config: FewShotConfig) -> nn.Module | None:
    """The learned inner-loop optimizer's weights: ``inner_rule="lstm"``, the coordinatewise LSTM optimizer
    starting from the paper-faithful ``mnist-lstm`` (a fixed name, not the package default: checkpoints store
    this architecture's weights); ``"meta-lstm"``, Ravi & Larochelle's meta-learner; ``None`` for SGD."""
    if config.inner_rule == "lstm":
        return load_net(PAPER_NET).to(config.device)
    if config.inner_rule == "meta-lstm":
        return MetaLearnerLSTM().to(config.device)
    return None


def inner_update(config: FewShotConfig, inner_net: nn.Module | None) -> float | UpdateRule:
    """What adapts the model in the inner loop: SGD's learning rate, or the learned rule."""
    if isinstance(inner_net, CoordinatewiseLSTM):
        return LSTMRule(inner_net)
    if isinstance(inner_net, MetaLearnerLSTM):
        return MetaLearnerRule(inner_net)
    return config.inner_lr


def _score(config: FewShotConfig, model: nn.Module, episode: Episode, inner_steps: int,
           inner: float | UpdateRule, query_batch: int | None = None) -> float:
    """Query accuracy (classification) or query MSE after adaptation (sinusoid)."""
    if config.algorithm in _EPISODIC:
        return _EPISODIC[config.algorithm][1](model, episode)
    if config.dataset == "sinusoid":
        params = {k: v.detach() for k, v in model.named_parameters()}
        with torch.no_grad():
            out = adapt(model, params, episode, inner_steps, inner, nn.functional.mse_loss, True)
            return out.meta_loss.item()
    return query_accuracy(model, episode, inner_steps, inner, query_batch)


def _load(path: Path, config: FewShotConfig | None) -> dict:
    ckpt = load_file(path, "learnedopt few-shot checkpoint")
    if not isinstance(ckpt, dict) or "fewshot_config" not in ckpt:
        raise ValueError(f"{path} is not a learnedopt few-shot checkpoint")
    if config is not None:
        saved = FewShotConfig(**ckpt["fewshot_config"])
        wrong = [k for k in _MUST_MATCH if getattr(saved, k) != getattr(config, k)]
        if wrong:
            details = ", ".join(f"{k}: checkpoint {getattr(saved, k)!r}, asked {getattr(config, k)!r}" for k in wrong)
            raise ValueError(f"{path} was trained with other settings ({details})")
    return ckpt


def train(config: FewShotConfig, out: Path, resume: bool = False, progress: bool = True,
          time_budget: float | None = None) -> nn.Module:
    """Meta-train MAML or ProtoNet; writes ``out/checkpoint.pt`` and TensorBoard logs to ``out/tb``.

    In the run loop meta-training uses (:class:`~learnedopt.meta.runs.RunLoop`): the folder is held by this process,
    and on ``KeyboardInterrupt`` the state at the last finished iteration is written as the checkpoint
    (:class:`~learnedopt.meta.runs.RunInterrupted`), so a resumed run continues exactly.
    """

    torch.manual_seed(config.seed)
    model = build_model(config).to(config.device)
    inner_net = _inner_net(config)
    inner = inner_update(config, inner_net)
    meta_params = list(model.parameters()) + (list(inner_net.parameters()) if inner_net is not None else [])
    opt = torch.optim.Adam(meta_params, lr=config.meta_lr)
    generator = torch.Generator().manual_seed(config.seed)
    run: dict[str, Any] = {"iteration": 0, "history": []}  # what changes as it trains, beside the weights
    path = out / "checkpoint.pt"
    if resume and path.is_file():
        ckpt = _load(path, config)
        model.load_state_dict(ckpt["model"])
        if inner_net is not None:
            inner_net.load_state_dict(ckpt["inner_net"])
        opt.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        run = {"iteration": ckpt["iteration"], "history": ckpt["history"]}
    tasks = _Tasks(config, "train", config.ways, config.shots, config.queries)
    val_ways = 5 if config.algorithm == "protonet" else config.ways  # ProtoNet trains 60-way, is scored 5-way
    val = _Tasks(config, "val", val_ways, config.shots, 15 if config.dataset == "omniglot" else 10)

    def state() -> dict:
        saved = {"fewshot_config": asdict(config), "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "generator": generator.get_state(), **run}
        if inner_net is not None:
            saved["inner_net"] = inner_net.state_dict()
        return saved

    def save(saved: dict) -> None:
        atomic_save(saved, path)

    run_loop = RunLoop(out, iterations=config.iterations, start=run["iteration"], eval_every=config.eval_every,
                       checkpoint_every=config.checkpoint_every, state=state, save=save, time_budget=time_budget,
                       progress=progress, desc=config.algorithm)
    with run_loop:
        while run["iteration"] < config.iterations:
            iteration = run["iteration"]
            if config.lr_halving:
                for group in opt.param_groups:
                    group["lr"] = config.meta_lr * 0.5 ** (iteration // config.lr_halving)
            if config.algorithm == "maml":
                episodes = [tasks.sample(generator) for _ in range(config.meta_batch)]
                loss = maml_step(model, opt, episodes, config.inner_steps, inner, _criterion(config),
                                 config.first_order, batched=config.dataset == "omniglot")
            else:
                opt.zero_grad()
                result = _EPISODIC[config.algorithm][0](model, dict(model.named_parameters()), tasks.sample(generator))
                result.meta_loss.backward()
                opt.step()
                loss = result.meta_loss.item()
            iteration = run["iteration"] = iteration + 1
            cadence = run_loop.finished(iteration)
            run_loop.log("train/meta_loss", loss, iteration)
            if cadence.evaluate:
                g = torch.Generator().manual_seed(config.seed + 1)
                score = sum(_score(config, model, val.sample(g), config.inner_steps, inner) for _ in range(100)) / 100
                run["history"].append({"iteration": iteration, "meta_loss": loss, "val": score})
                run_loop.log("val/score", score, iteration)
                run_loop.bar.set_postfix(loss=f"{loss:.3f}", val=f"{score:.3f}")
            run_loop.end(cadence)
            if cadence.out_of_time:
                break
    return model


def load_checkpoint(
    path: str | Path, device: str = "cpu"
) -> tuple[nn.Module, FewShotConfig, nn.Module | None]:
    """The trained model, its run's configuration and (``inner_rule="lstm"`` or ``"meta-lstm"``) the learned
    inner-loop net.

    Example (any ``checkpoint.pt`` written by ``learnedopt maml|protonet|matching train``)::

        model, config, inner_net = load_checkpoint("results/checkpoints/maml-omniglot-5w1s.pt")
    """
    path = Path(path)
    ckpt = _load(path, None)
    config = replace(FewShotConfig(**ckpt["fewshot_config"]), device=device)
    model = build_model(config).to(device)
    inner_net = _inner_net(config)
    try:
        model.load_state_dict(ckpt["model"])
        if inner_net is not None:
            inner_net.load_state_dict(ckpt["inner_net"])
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the saved architecture ({type(err).__name__})") from None
    return model, config, inner_net


def evaluate(checkpoint: Path, ways: int, shots: int, episodes: int, inner_steps: int | None = None,
             queries: int = 15, device: str = "cpu", data_dir: str | None = None, seed: int = 0,
             query_batch: int | None = None) -> tuple[str, float, float]:
    """The metric's name ("accuracy" or "mse"), its mean over ``episodes`` test episodes, and the 95% CI half-width.

    ``inner_steps=None`` adapts with the checkpoint's own number of steps (those its validation used);
    ``query_batch`` is the number of query images classified at once (see :func:`baselines.maml.query_accuracy`).
    """
    model, config, inner_net = load_checkpoint(checkpoint, device)
    config = replace(config, data_dir=data_dir, shots=shots)
    if inner_steps is None:
        inner_steps = config.inner_steps
    if config.algorithm == "maml" and config.dataset == "omniglot" and ways != config.ways:
        raise ValueError(f"{checkpoint} is a {config.ways}-way MAML classifier; it cannot run {ways}-way episodes")
    inner = inner_update(config, inner_net)
    tasks = _Tasks(config, "test", ways, shots, queries)
    g = torch.Generator().manual_seed(seed)
    scores = torch.tensor([_score(config, model, tasks.sample(g), inner_steps, inner, query_batch) for _ in range(episodes)])
    metric = "mse" if config.dataset == "sinusoid" else "accuracy"
    return metric, float(scores.mean()), float(1.96 * scores.std() / math.sqrt(episodes))
