"""Training and evaluation runs for MAML and ProtoNet: checkpoints, resume, TensorBoard, progress bars, seeds.

``learnedopt maml train|eval`` and ``learnedopt protonet train|eval`` call :func:`train` and :func:`evaluate`.
A checkpoint records the algorithm, dataset, N-way and architecture; evaluating or resuming it with other
settings fails with a message that says which.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from learnedopt import CoordinatewiseLSTM, LSTMRule, UpdateRule, load_net
from .omniglot import load_omniglot
from learnedopt.pretrained import atomic_save, load_file
from learnedopt.runs import RunLoop

from .episodes import Episode, EpisodeSampler, sample_sinusoids
from .maml import adapt, maml_step, query_accuracy
from .models import conv4, sinusoid_mlp
from .protonet import episode_accuracy, episode_loss

__all__ = ["FewShotConfig", "train", "evaluate", "load_checkpoint"]

PAPER_NET = "mnist-lstm"
_MUST_MATCH = ("algorithm", "dataset", "ways", "channels", "strided", "inner_rule")


@dataclass
class FewShotConfig:
    """One few-shot run. Defaults follow the papers (MAML Omniglot 5-way; ProtoNet 60-way training episodes)."""

    algorithm: str = "maml"  # "maml" or "protonet"
    dataset: str = "omniglot"  # "omniglot" or "sinusoid" (MAML only)
    ways: int = 5
    shots: int = 1
    queries: int = 1  # query examples per class in training episodes (ProtoNet: 5; MAML: K, as the papers)
    iterations: int = 60000
    meta_batch: int = 32
    meta_lr: float = 1e-3
    inner_steps: int = 1
    inner_lr: float = 0.4
    inner_rule: str = "sgd"  # "sgd", or "lstm": the learned LSTM optimizer, meta-trained with the initialization
    first_order: bool = False
    channels: int = 64
    strided: bool = True  # MAML's Omniglot Conv-4 uses stride-2 convolutions; ProtoNet uses max-pooling
    lr_halving: int = 0  # halve the meta learning rate every N iterations (ProtoNet: 2000); 0 = never
    eval_every: int = 500
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ("maml", "protonet"):
            raise ValueError(f"algorithm must be 'maml' or 'protonet', got {self.algorithm!r}")
        if self.dataset not in ("omniglot", "sinusoid") or (self.algorithm == "protonet" and self.dataset != "omniglot"):
            raise ValueError(f"dataset {self.dataset!r} is not available for {self.algorithm}")
        if self.inner_rule not in ("sgd", "lstm") or (self.algorithm == "protonet" and self.inner_rule != "sgd"):
            raise ValueError(f"inner rule {self.inner_rule!r} is not available for {self.algorithm}")


def build_model(config: FewShotConfig) -> nn.Module:
    if config.dataset == "sinusoid":
        return sinusoid_mlp()
    ways = None if config.algorithm == "protonet" else config.ways
    return conv4(ways, config.channels, strided=config.strided)


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


def _inner_net(config: FewShotConfig) -> CoordinatewiseLSTM | None:
    """The learned inner-loop optimizer (``inner_rule="lstm"``), starting from the paper-faithful ``mnist-lstm``.

    A fixed name, not the package default: checkpoints store this architecture's weights.
    """
    return load_net(PAPER_NET).to(config.device) if config.inner_rule == "lstm" else None


def _score(config: FewShotConfig, model: nn.Module, episode: Episode, inner_steps: int,
           rule: UpdateRule | None, query_batch: int | None = None) -> float:
    """Query accuracy (classification) or query MSE after adaptation (sinusoid)."""
    if config.algorithm == "protonet":
        return episode_accuracy(model, episode)
    if config.dataset == "sinusoid":
        params = {k: v.detach() for k, v in model.named_parameters()}
        with torch.no_grad():
            out = adapt(model, params, episode, inner_steps, config.inner_lr, nn.functional.mse_loss, True, rule)
            return out.meta_loss.item()
    return query_accuracy(model, episode, inner_steps, config.inner_lr, rule, query_batch)


def _load(path: Path, config: FewShotConfig | None) -> dict:
    ckpt = load_file(path, "learnedopt few-shot checkpoint")
    if not isinstance(ckpt, dict) or "fewshot_config" not in ckpt:
        raise ValueError(f"{path} is not a learnedopt few-shot checkpoint")
    if config is not None:
        saved = ckpt["fewshot_config"]
        defaults = FewShotConfig()  # checkpoints from before a field existed used its default
        wrong = [k for k in _MUST_MATCH if saved.get(k, getattr(defaults, k)) != getattr(config, k)]
        if wrong:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, asked {getattr(config, k)!r}" for k in wrong)
            raise ValueError(f"{path} was trained with other settings ({details})")
    return ckpt


def train(config: FewShotConfig, out: Path, resume: bool = False, progress: bool = True,
          time_budget: float | None = None) -> nn.Module:
    """Meta-train MAML or ProtoNet; writes ``out/checkpoint.pt`` and TensorBoard logs to ``out/tb``.

    In the run loop meta-training uses (:class:`~learnedopt.runs.RunLoop`): the folder is held by this process,
    and on ``KeyboardInterrupt`` the state at the last finished iteration is written as the checkpoint
    (:class:`~learnedopt.runs.RunInterrupted`), so a resumed run continues exactly.
    """

    torch.manual_seed(config.seed)
    model = build_model(config).to(config.device)
    inner_net = _inner_net(config)
    rule = LSTMRule(inner_net) if inner_net is not None else None
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
    val_ways = config.ways if config.algorithm == "maml" else 5  # ProtoNet trains 60-way, is scored 5-way
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
                loss = maml_step(model, opt, episodes, config.inner_steps, config.inner_lr, _criterion(config),
                                 config.first_order, rule, batched=config.dataset == "omniglot")
            else:
                opt.zero_grad()
                result = episode_loss(model, dict(model.named_parameters()), tasks.sample(generator))
                result.meta_loss.backward()
                opt.step()
                loss = result.meta_loss.item()
            iteration = run["iteration"] = iteration + 1
            cadence = run_loop.finished(iteration)
            run_loop.log("train/meta_loss", loss, iteration)
            if cadence.evaluate:
                g = torch.Generator().manual_seed(config.seed + 1)
                score = sum(_score(config, model, val.sample(g), config.inner_steps, rule) for _ in range(100)) / 100
                run["history"].append({"iteration": iteration, "meta_loss": loss, "val": score})
                run_loop.log("val/score", score, iteration)
                run_loop.bar.set_postfix(loss=f"{loss:.3f}", val=f"{score:.3f}")
            run_loop.end(cadence)
            if cadence.out_of_time:
                break
    return model


def load_checkpoint(
    path: str | Path, device: str = "cpu"
) -> tuple[nn.Module, FewShotConfig, CoordinatewiseLSTM | None]:
    """The trained model, its run's configuration and (``inner_rule="lstm"``) the learned inner-loop net.

    Example (any ``checkpoint.pt`` written by ``learnedopt maml|protonet train``)::

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
    rule = LSTMRule(inner_net) if inner_net is not None else None
    tasks = _Tasks(config, "test", ways, shots, queries)
    g = torch.Generator().manual_seed(seed)
    scores = torch.tensor([_score(config, model, tasks.sample(g), inner_steps, rule, query_batch) for _ in range(episodes)])
    metric = "mse" if config.dataset == "sinusoid" else "accuracy"
    return metric, float(scores.mean()), float(1.96 * scores.std() / math.sqrt(episodes))
