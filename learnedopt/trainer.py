"""Meta-training of the LSTM optimizer on truncated unrolls of optimization.

An *iteration* samples a batch of tasks, optimizes them for ``horizon`` steps with the LSTM rule, and after
every ``unroll`` steps turns the truncation into a meta-gradient for the LSTM's weights (one Adam step of the
meta-optimizer) with a :class:`~learnedopt.GradientEstimator`: truncated backprop by default, or antithetic /
persistent evolution strategies (``--estimator es|pes``). Under ``torchrun`` the task batch is split across
processes and meta-gradients are averaged (:mod:`learnedopt.distributed`).

:func:`meta_train` is the one-call entry point for a family of your own (:class:`~learnedopt.tasks.ModuleFamily`);
``learnedopt meta-train`` drives :class:`MetaTrainer` from the command line.

Runs are reproducible and resumable: all randomness comes from generators whose state is checkpointed
(atomically) with the net and the meta-optimizer, so a resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .distributed import all_reduce_mean, any_rank, broadcast_from_lead, rank_and_world, shard
from .estimators import ESTIMATORS, AntitheticES, GradientEstimator, PersistentES, TruncatedBackprop
from .evaluation import BASELINES, TUNE_SEED, final_score, run_rule, tune_lr
from .imitation import imitation_step
from .lstm import CoordinatewiseLSTM, LSTMConfig, LSTMRule
from .pretrained import atomic_save, load_file, load_net, non_finite, save_net
from .runs import FiniteSteps, MetaTrainingDiverged, RunLoop
from .tasks import RescaledTask, Task, TaskFamily

__all__ = ["MetaTrainConfig", "MetaTrainer", "meta_train"]

_RESUME_MUST_MATCH = (
    "task", "horizon", "unroll", "meta_batch", "hidden_size", "num_layers", "objective", "seed", "estimator",
    "inputs", "output", "output_scale", "curriculum", "rescale", "imitation",
)
# what a setting means in a checkpoint written before it existed
_SAVED_DEFAULTS = {"inputs": "paper", "output": "linear", "curriculum": (), "rescale": 0.0, "imitation": 0}


@dataclass
class MetaTrainConfig:
    """Everything that defines a meta-training run (saved in every checkpoint)."""

    task: str = ""  # the family's label, saved and checked on resume ("": the family's name)
    iterations: int = 300
    horizon: int = 100
    unroll: int = 20
    meta_batch: int = 0  # 0: the task family's default (128 quadratics, 8 MNIST networks)
    meta_lr: float = 3e-3
    clip: float = 1.0
    objective: str = "log"  # "sum": the paper's sum of losses; "log": sum of log-losses (weighs relative progress)
    hidden_size: int = 20
    num_layers: int = 2
    output_scale: float = 0.0  # 0: the output map's default (0.1 for "linear", 1e-3 for "adam")
    inputs: str = "normalized"  # LSTM inputs: "paper" (log|g|/p, sign g) or "normalized" (see LSTMConfig)
    output: str = "adam"  # "linear" (the paper's) or "adam" (bounded modulation of a nominal Adam step)
    curriculum: tuple[int, ...] = ()  # later training horizons; move on when held-out scores stop improving
    patience: int = 2  # evaluations without a better stage score before the curriculum moves on
    rescale: float = 0.0  # random objective rescaling f(c * theta), log c ~ U(-rescale, rescale) per coordinate
    imitation: int = 0  # warm start: iterations fitting the LSTM's steps to tuned Adam's before meta-training
    eval_every: int = 25
    eval_tasks: int = 0  # 0: the task family's default
    eval_lengths: tuple[int, ...] = ()  # run lengths scored on held-out tasks; () means (horizon, 2 * horizon)
    checkpoint_every: int = 25
    seed: int = 0
    device: str = "cpu"
    init_net: str | None = None  # start from these weights (packaged name, net.pt, run folder); scored first, so
    # net.pt is never worse on held-out tasks than the net fine-tuning started from
    estimator: str = "tbptt"  # meta-gradient estimator: "tbptt", "es" (antithetic ES) or "pes" (persistent ES)
    es_pairs: int = 8  # antithetic pairs per truncation (es, pes)
    es_sigma: float = 0.01  # standard deviation of the weight perturbations (es, pes)
    checkpoint: int = 0  # tbptt: recompute segments of this many steps in backward instead of storing them
    max_skipped: int = 20  # meta-steps in a row with non-finite meta-gradients (all skipped) before the run stops

    def __post_init__(self) -> None:
        self.curriculum = tuple(self.curriculum)
        for horizon in (self.horizon, *self.curriculum):
            if horizon % self.unroll:
                raise ValueError(f"horizon ({horizon}) must be a multiple of unroll ({self.unroll})")
        if self.rescale < 0 or self.imitation < 0 or self.patience < 1 or self.output_scale < 0:
            raise ValueError("rescale, imitation and output_scale must be >= 0 and patience >= 1")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.max_skipped < 1:
            raise ValueError(f"max_skipped must be >= 1, got {self.max_skipped}")
        if self.checkpoint < 0:
            raise ValueError(f"checkpoint must be >= 0 (0: store every step), got {self.checkpoint}")
        if self.es_pairs < 1 or not self.es_sigma > 0:
            raise ValueError(f"es_pairs must be >= 1 and es_sigma > 0, got {self.es_pairs} and {self.es_sigma}")
        if self.objective not in ("sum", "log"):
            raise ValueError(f"objective must be 'sum' or 'log', got {self.objective!r}")
        for name in ("iterations", "horizon", "unroll", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("meta_batch", "eval_tasks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the task's default), got {getattr(self, name)}")


class MetaTrainer:
    """Meta-train a :class:`~learnedopt.CoordinatewiseLSTM` on ``family``; writes ``net.pt`` to ``out``.

    Files in ``out``: ``checkpoint.pt`` (resume point), ``net.pt`` (the net with the best held-out score, see
    :meth:`evaluate`: selecting by meta-loss would favour early progress over the final loss),
    ``last.pt`` (the latest net) and ``tb/`` (TensorBoard).

    ``family`` must be built on ``config.device``. ``fused`` (default true) differentiates the LSTM cells with
    their fused backward; false keeps autograd's op-by-op record (the reference path, for benchmarks).

    Example:
        >>> import torch
        >>> from learnedopt import ModuleFamily
        >>> data = (torch.randn(256, 4), torch.randn(256, 1))
        >>> family = ModuleFamily(lambda: torch.nn.Linear(4, 1), data, torch.nn.functional.mse_loss, 32, name="lin")
        >>> cfg = MetaTrainConfig(iterations=2, horizon=20, unroll=10, meta_batch=4, eval_every=2, eval_tasks=4)
        >>> net = MetaTrainer(family, cfg, out="/tmp/learnedopt-doctest", progress=False).train()
    """

    def __init__(
        self, family: TaskFamily, config: MetaTrainConfig, out: str | Path, *, resume: bool = False,
        progress: bool = True,
    ) -> None:
        if not isinstance(family, TaskFamily):
            raise TypeError(f"family must be a task family (e.g. learnedopt.ModuleFamily), got {type(family).__name__}")
        family_device = getattr(family, "device", None)
        if family_device is not None and torch.device(family_device).type != torch.device(config.device).type:
            raise ValueError(f"the family's tasks live on {family_device} but device={config.device!r}: build the "
                             f"family with device={config.device!r} too")
        self.out = Path(out)
        self.progress = progress
        self.fused = True
        self.family = family
        config = replace(
            config,
            task=config.task or family.name,
            meta_batch=config.meta_batch or self.family.default_meta_batch,
            eval_tasks=config.eval_tasks or self.family.default_eval_tasks,
        )
        self.config = config
        torch.manual_seed(config.seed)
        scale = config.output_scale or (0.1 if config.output == "linear" else 1e-3)
        self.net = CoordinatewiseLSTM(
            LSTMConfig(
                hidden_size=config.hidden_size, num_layers=config.num_layers, output_scale=scale,
                inputs=config.inputs, output=config.output,
            )
        )
        if config.init_net:
            start = load_net(config.init_net)
            if start.config != self.net.config:
                raise ValueError(f"--init-net {config.init_net} has architecture {start.config}, not {self.net.config}")
            self.net.load_state_dict(start.state_dict())
        self.net.to(config.device)
        self.meta_opt = torch.optim.Adam(self.net.parameters(), lr=config.meta_lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        self.best_score = math.inf
        self.adam_lrs: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.stage = 0  # index into (horizon, *curriculum)
        self.stage_best = math.inf
        self.stale = 0  # evaluations since the stage's score last improved
        self.imitated = 0  # imitation iterations done
        self.finite_steps = FiniteSteps(config.max_skipped)
        checkpoint = self.out / "checkpoint.pt"
        if resume and checkpoint.is_file():
            self._load(checkpoint)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (what ``checkpoint.pt`` holds)."""
        return {
            "config": asdict(self.config),
            "iteration": self.iteration,
            "net": self.net.state_dict(),
            "meta_opt": self.meta_opt.state_dict(),
            "generator": self.generator.get_state(),
            "best_score": self.best_score,
            "adam_lrs": self.adam_lrs,
            "history": self.history,
            "curriculum": {"stage": self.stage, "stage_best": self.stage_best, "stale": self.stale},
            "imitated": self.imitated,
            "finite_steps": self.finite_steps.state_dict(),
        }

    def _save(self, state: dict[str, Any]) -> None:
        bad = non_finite(state["net"])
        if bad:  # FiniteSteps never lets this happen; a checkpoint must not carry such weights on
            raise MetaTrainingDiverged(f"not writing {self.out / 'checkpoint.pt'}: the net's weights {bad} are "
                                       f"not finite at iteration {state['iteration']}")
        atomic_save(state, self.out / "checkpoint.pt")

    def _load(self, path: Path) -> None:
        ckpt = load_file(path, "meta-training checkpoint")
        if not isinstance(ckpt, dict) or not {"config", "net", "meta_opt"} <= set(ckpt):
            raise ValueError(f"cannot resume: {path} is not a meta-training checkpoint (a few-shot run's?)")
        saved = ckpt["config"]
        def value(key: str) -> Any:
            v = saved.get(key, _SAVED_DEFAULTS.get(key))
            return tuple(v) if isinstance(v, list) else v

        mismatched = [k for k in _RESUME_MUST_MATCH if value(k) != getattr(self.config, k)]
        if mismatched:
            details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {getattr(self.config, k)!r}" for k in mismatched)
            raise ValueError(f"cannot resume {path}: the run was started with other settings ({details})")
        self.net.load_state_dict(ckpt["net"])
        self.net.to(self.config.device)
        self.meta_opt.load_state_dict(ckpt["meta_opt"])
        saved_lr = saved.get("meta_lr", self.config.meta_lr)
        if saved_lr != self.config.meta_lr:  # a deliberate change of the rate is applied, and said
            for group in self.meta_opt.param_groups:
                group["lr"] = self.config.meta_lr
            warnings.warn(f"resuming {path} with meta-lr {self.config.meta_lr:g} (the run so far used {saved_lr:g})")
        self.generator.set_state(ckpt["generator"])
        self.iteration = ckpt["iteration"]
        self.best_score = ckpt["best_score"]
        self.adam_lrs = ckpt["adam_lrs"]
        self.history = ckpt["history"]
        stage = ckpt.get("curriculum", {})
        self.stage, self.stage_best, self.stale = stage.get("stage", 0), stage.get("stage_best", math.inf), stage.get(
            "stale", 0
        )
        self.imitated = ckpt.get("imitated", 0)
        self.finite_steps = FiniteSteps(self.config.max_skipped, **ckpt.get("finite_steps", {}))

    # -- training ----------------------------------------------------------------------------------------------
    def meta_step(self) -> float:
        """One iteration: sample tasks, unroll the horizon in truncations, one meta-update per truncation.

        Under ``torch.distributed`` this rank unrolls its block of the task batch and the meta-gradients are
        averaged over ranks before the (identical) meta-optimizer step.
        """
        cfg = self.config
        horizon = self.horizon
        task: Task = shard(self.family.sample(cfg.meta_batch, self.generator))
        if cfg.rescale:
            task = RescaledTask(task, cfg.rescale)
        estimator = self._estimator()
        carry = estimator.start(task.init_params(self.generator))
        rule = LSTMRule(self.net, fused=self.fused)
        meta_params = list(self.net.parameters())
        transform = torch.log if cfg.objective == "log" else None
        total, stepped = torch.zeros((), dtype=torch.float64), 0
        for start in range(0, horizon, cfg.unroll):

            def batch(t: int, start: int = start) -> Any:
                return task.batch(start + t)

            grads, meta_loss, carry = estimator.estimate(
                meta_params, rule, task.loss, carry, cfg.unroll, batch, transform=transform, generator=self.generator
            )
            loss = torch.tensor([meta_loss], dtype=grads[0].dtype, device=grads[0].device)
            all_reduce_mean([*grads, loss])  # one collective; every rank then makes the same skip decision
            for p, g in zip(meta_params, grads):
                p.grad = g
            if self.finite_steps.step(self.meta_opt, meta_params, cfg.clip, loss, f"iteration {self.iteration + 1}"):
                total += loss.double().cpu()[0]
                stepped += 1
        return total.item() / stepped if stepped else math.nan

    @property
    def horizon(self) -> int:
        """The training horizon of the current curriculum stage."""
        return (self.config.horizon, *self.config.curriculum)[self.stage]

    def eval_lengths(self) -> tuple[int, ...]:
        """Run lengths scored on held-out tasks: ``eval_lengths``, else the first horizon, twice it, and the
        curriculum's last horizon."""
        cfg = self.config
        lengths = cfg.eval_lengths or (cfg.horizon, 2 * cfg.horizon, *cfg.curriculum[-1:])
        return tuple(sorted(set(lengths)))

    def _adam_lr(self, family: TaskFamily, steps: int) -> float:
        """Adam's best learning rate for ``family`` at ``steps``, tuned once on the tuning tasks and cached."""
        key = f"{family.name}@{steps}"
        if key not in self.adam_lrs:
            task = family.sample(self.config.eval_tasks, torch.Generator().manual_seed(TUNE_SEED))
            self.adam_lrs[key], _ = tune_lr(task, BASELINES["Adam"], steps)
        return self.adam_lrs[key]

    def imitate(self) -> float:
        """One imitation iteration (warm start): a random member family's tasks, Adam at its tuned rate as teacher."""
        cfg = self.config
        members = self.family.components()
        family = members[int(torch.randint(0, len(members), (1,), generator=self.generator))]
        task = shard(family.sample(cfg.meta_batch, self.generator))
        teacher = BASELINES["Adam"](self._adam_lr(family, cfg.horizon))
        return imitation_step(
            LSTMRule(self.net), teacher, task, cfg.horizon, cfg.unroll, self.meta_opt, self.generator, cfg.clip,
            reduce=all_reduce_mean, finite_steps=self.finite_steps, label=f"imitation iteration {self.imitated + 1}",
        )

    def _estimator(self) -> GradientEstimator:
        cfg = self.config
        if cfg.estimator == "tbptt":
            return TruncatedBackprop(checkpoint=cfg.checkpoint)
        return (AntitheticES if cfg.estimator == "es" else PersistentES)(cfg.es_pairs, cfg.es_sigma)

    def evaluate(self) -> dict[str, float]:
        """Score the current net against tuned Adam on held-out tuning tasks.

        For each component family (one, or each member of a mixture) and each run length L (the horizon and
        twice it, by default): the ratio of the net's median final loss to that of Adam at its best learning
        rate for L. ``score``, the mean log-ratio, selects ``net.pt``: it rewards the final loss, also beyond
        the horizon trained on, rather than the meta-loss.
        """
        cfg = self.config
        rule = LSTMRule(self.net)
        scores: dict[str, float] = {}
        log_ratios = []
        for family in self.family.components():
            task = family.sample(cfg.eval_tasks, torch.Generator().manual_seed(TUNE_SEED))
            for steps in self.eval_lengths():
                key = f"{family.name}@{steps}"
                lstm = final_score(task, run_rule(task, rule, steps, TUNE_SEED))
                adam_rule = BASELINES["Adam"](self._adam_lr(family, steps))
                adam = final_score(task, run_rule(task, adam_rule, steps, TUNE_SEED))
                scores[f"eval/lstm_final_loss/{key}"] = lstm
                scores[f"eval/ratio_to_adam/{key}"] = lstm / adam
                log_ratios.append(math.log(lstm / adam) if lstm > 0 and math.isfinite(lstm) else math.inf)
        scores["eval/score"] = sum(log_ratios) / len(log_ratios)
        return scores

    def train(self, time_budget: float | None = None) -> CoordinatewiseLSTM:
        """Run (or continue) training up to ``config.iterations``; returns the selected net.

        ``time_budget`` (seconds) ends training early, after a held-out evaluation and a checkpoint, once the
        budget is spent; ``--resume`` continues from there. The folder is held by this process for the run
        (another one is refused, :class:`~learnedopt.runs.RunFolderInUse`); on ``KeyboardInterrupt`` the state at
        the last finished iteration is written as the checkpoint and :class:`~learnedopt.runs.RunInterrupted`
        raised, so a resumed run ends bit-identical to one never interrupted. Meta-steps with non-finite
        meta-gradients are skipped (:class:`~learnedopt.runs.FiniteSteps`; ``max_skipped`` in a row raise
        :class:`~learnedopt.runs.MetaTrainingDiverged`), and no file is written with non-finite weights.
        """
        cfg = self.config
        run = RunLoop(self.out, iterations=cfg.iterations, start=self.iteration, eval_every=cfg.eval_every,
                      checkpoint_every=cfg.checkpoint_every, state=self._state, save=self._save,
                      time_budget=time_budget, progress=self.progress, desc="meta-train", device=cfg.device)
        with run:
            self._train(run)
            if run.lead and not (self.out / "net.pt").is_file():
                self._save_net("net.pt")
            _barrier()
        return load_net(self.out / "net.pt")

    def _train(self, run: RunLoop) -> None:
        """:meth:`train`'s iterations: imitation, then meta-iterations, each ending at a resume point."""
        cfg = self.config
        while self.imitated < cfg.imitation and not run.out_of_time():
            mismatch = self.imitate()
            self.imitated += 1
            run.bar.set_postfix(imitation=f"{mismatch:.3g}")
            run.log("imitation/step_mismatch", mismatch, self.imitated)
            state = run.mark()
            if run.lead and self.imitated == cfg.imitation:
                self._save(state)
        if cfg.init_net and self.iteration == 0 and not self.history and run.lead:
            self._evaluate_and_select(run, math.nan)  # fine-tuning must beat its starting point
        while self.iteration < cfg.iterations:
            meta_loss = self.meta_step()
            self.iteration += 1
            cadence = run.finished(self.iteration, meta_loss=f"{meta_loss:.3g}")
            run.log("meta_loss", meta_loss, self.iteration)
            run.log("meta/skipped_steps", self.finite_steps.skipped, self.iteration)
            advance = False
            if cadence.evaluate and run.lead:
                score = self._evaluate_and_select(run, meta_loss)
                run.bar.set_postfix(meta_loss=f"{meta_loss:.3g}", score=f"{score:.3f}")
                advance = self._stage_is_done(score)
            if cadence.evaluate and self.stage < len(cfg.curriculum) and any_rank(advance, cfg.device):
                self._next_stage()
                run.log("curriculum/horizon", self.horizon, self.iteration)
            if cadence.checkpoint and run.lead:
                self._save_net("last.pt")
            run.end(cadence)
            if cadence.out_of_time:
                break

    def _evaluate_and_select(self, run: RunLoop, meta_loss: float) -> float:
        """Score the net on held-out tasks, log it, and write ``net.pt`` if it is the best so far."""
        scores = self.evaluate()
        for key, value in scores.items():
            run.log(key, value, self.iteration)
        self.history.append({"iteration": self.iteration, "horizon": self.horizon, "meta_loss": meta_loss, **scores})
        if scores["eval/score"] < self.best_score:
            self.best_score = scores["eval/score"]
            self._save_net("net.pt")
        return scores["eval/score"]

    def _stage_is_done(self, score: float) -> bool:
        """Track the stage's best held-out score; true once it has not improved for ``patience`` evaluations."""
        if score < self.stage_best:
            self.stage_best, self.stale = score, 0
        else:
            self.stale += 1
        return self.stale >= self.config.patience

    def _next_stage(self) -> None:
        """Move to the next curriculum horizon, from the best weights so far (Chen et al. 2020)."""
        if rank_and_world()[0] == 0 and (self.out / "net.pt").is_file():
            self.net.load_state_dict(load_net(self.out / "net.pt").state_dict())
        broadcast_from_lead(list(self.net.parameters()))
        self.stage += 1
        self.stage_best, self.stale = math.inf, 0

    def _save_net(self, name: str) -> None:
        save_net(
            self.net,
            self.out / name,
            task=self.config.task,
            iteration=self.iteration,
            best_held_out_score=self.best_score,
            train_config=asdict(self.config),
            history=self.history,
        )


def meta_train(
    family: TaskFamily,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    time_budget: float | None = None,
    **settings: Any,
) -> CoordinatewiseLSTM:
    """Meta-train an LSTM optimizer on ``family`` and return the net selected on held-out tasks.

    Writes ``out/net.pt`` (load it with ``LearnedOptimizer(params, net="out/net.pt")``), ``out/checkpoint.pt``,
    ``out/last.pt`` and TensorBoard logs in ``out/tb``. ``settings`` are :class:`MetaTrainConfig` fields
    (``iterations``, ``horizon``, ``unroll``, ``meta_batch``, ``estimator``, ``device``...). ``resume=True``
    continues the run in ``out`` exactly where it stopped (``time_budget`` seconds end a segment early);
    a run already in ``out`` is never replaced unless ``overwrite=True``.

    Example:
        >>> import torch, learnedopt
        >>> data = (torch.randn(512, 8), torch.randint(0, 3, (512,)))
        >>> family = learnedopt.ModuleFamily(lambda: torch.nn.Linear(8, 3), data,
        ...                                  torch.nn.functional.cross_entropy, batch_size=32, name="linear")
        >>> net = learnedopt.meta_train(family, "/tmp/learnedopt-doctest-mine", iterations=2, horizon=20, unroll=10,
        ...                             meta_batch=4, eval_tasks=4, progress=False, overwrite=True)
        >>> opt = learnedopt.LearnedOptimizer(torch.nn.Linear(8, 3).parameters(),
        ...                                   net="/tmp/learnedopt-doctest-mine/net.pt")
    """
    known = {f.name for f in fields(MetaTrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown meta-training settings {unknown}; choose from {', '.join(sorted(known))}")
    if (Path(out) / "checkpoint.pt").is_file() and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds a run: pass resume=True, overwrite=True, or another out")
    trainer = MetaTrainer(family, MetaTrainConfig(**settings), out, resume=resume, progress=progress)
    return trainer.train(time_budget=time_budget)


def _barrier() -> None:
    """Wait until rank 0 has written its files (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()
