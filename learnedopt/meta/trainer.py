"""Meta-training of the LSTM optimizer on truncated unrolls of optimization.

An *iteration* samples a batch of tasks, optimizes them for ``horizon`` steps with the LSTM rule, and after
every ``unroll`` steps turns the truncation into a meta-gradient for the LSTM's weights (one Adam step of the
meta-optimizer) with a :class:`~learnedopt.GradientEstimator`: truncated backprop by default, or antithetic /
persistent evolution strategies (``--estimator es|pes``). Under ``torchrun`` the task batch is split across
processes and meta-gradients are averaged (:mod:`learnedopt.meta.distributed`).

:func:`meta_train` is the one-call entry point for a family of your own (:class:`~learnedopt.meta.tasks.ModuleFamily`);
``learnedopt meta-train`` drives :class:`MetaTrainer` from the command line.

Runs are reproducible and resumable: all randomness comes from generators whose state is checkpointed
(atomically) with the net and the meta-optimizer, so a resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..lstm import CoordinatewiseLSTM, LSTMRule
from ..pretrained import atomic_save, load_file, load_net, non_finite, save_net
from .config import MetaTrainConfig
from .distributed import all_reduce_mean, any_rank, broadcast_from_lead, rank_and_world, shard
from .estimators import AntitheticES, GradientEstimator, PersistentES, TruncatedBackprop
from .evaluation import BASELINES
from .imitation import imitation_step
from .runs import FiniteSteps, MetaTrainingDiverged, RunLoop
from .selection import Selection
from .tasks import RescaledTask, Task, TaskFamily

__all__ = ["MetaTrainer", "meta_train"]

class MetaTrainer:
    """Meta-train a :class:`~learnedopt.CoordinatewiseLSTM` on ``family``; writes ``net.pt`` to ``out``.

    Files in ``out``: ``checkpoint.pt`` (resume point), ``net.pt`` (the net with the best held-out score,
    :class:`~learnedopt.meta.selection.Selection`), ``last.pt`` (the latest net) and ``tb/`` (TensorBoard).
    ``family`` must be built on ``config.device``.

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
        _check_family(family, config)
        self.out, self.progress, self.family = Path(out), progress, family
        self.config = config = replace(
            config,
            task=config.task or family.name,
            meta_batch=config.meta_batch or family.default_meta_batch,
            eval_tasks=config.eval_tasks or family.default_eval_tasks,
        )
        torch.manual_seed(config.seed)
        self.net = CoordinatewiseLSTM(config.net)
        if config.init_net:
            start = load_net(config.init_net)
            if start.config != self.net.config:
                raise ValueError(f"--init-net {config.init_net} has architecture {start.config}, not {self.net.config}")
            self.net.load_state_dict(start.state_dict())
        self.net.to(config.device)
        self.meta_opt = torch.optim.Adam(self.net.parameters(), lr=config.meta_lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration, self.imitated = 0, 0  # meta-iterations and imitation iterations done
        self.selection = Selection(family, config)
        self.finite_steps = FiniteSteps(config.max_skipped)
        if resume and (self.out / "checkpoint.pt").is_file():
            self._load(self.out / "checkpoint.pt")

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (what ``checkpoint.pt`` holds)."""
        return {
            "config": asdict(self.config), "iteration": self.iteration, "net": self.net.state_dict(),
            "meta_opt": self.meta_opt.state_dict(), "generator": self.generator.get_state(),
            "imitated": self.imitated, "finite_steps": self.finite_steps.state_dict(), **self.selection.state_dict(),
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
        saved = _resumable(ckpt["config"], self.config, path)
        self.net.load_state_dict(ckpt["net"])
        self.net.to(self.config.device)
        self.meta_opt.load_state_dict(ckpt["meta_opt"])
        if saved.meta_lr != self.config.meta_lr:  # a deliberate change of the rate is applied, and said
            self.meta_opt.param_groups[0]["lr"] = self.config.meta_lr
            warnings.warn(f"resuming {path} with meta-lr {self.config.meta_lr:g} (so far: {saved.meta_lr:g})")
        self.generator.set_state(ckpt["generator"])
        self.iteration, self.imitated = ckpt["iteration"], ckpt.get("imitated", 0)
        self.selection.load_state_dict(ckpt)
        self.finite_steps = FiniteSteps(self.config.max_skipped, **ckpt.get("finite_steps", {}))

    # -- training ----------------------------------------------------------------------------------------------
    def meta_step(self) -> float:
        """One iteration: sample tasks, unroll the horizon in truncations, one meta-update per truncation.

        Under ``torch.distributed`` this rank unrolls its block of the task batch and the meta-gradients are
        averaged over ranks before the (identical) meta-optimizer step.
        """
        cfg = self.config
        task: Task = shard(self.family.sample(cfg.meta_batch, self.generator))
        if cfg.rescale:
            task = RescaledTask(task, cfg.rescale)
        estimator = _estimator(cfg)
        carry = estimator.start(task.init_params(self.generator))
        rule = LSTMRule(self.net, backend=cfg.backend)
        meta_params = list(self.net.parameters())
        transform = torch.log if cfg.objective == "log" else None
        total, stepped = torch.zeros((), dtype=torch.float64), 0
        for start in range(0, self.selection.horizon, cfg.unroll):

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

    def imitate(self) -> float:
        """One imitation iteration (warm start): a random member family's tasks, Adam at its tuned rate as teacher."""
        cfg = self.config
        members = self.family.components()
        family = members[int(torch.randint(0, len(members), (1,), generator=self.generator))]
        task = shard(family.sample(cfg.meta_batch, self.generator))
        teacher = BASELINES["Adam"](self.selection.adam_lr(family, cfg.horizon))
        return imitation_step(
            LSTMRule(self.net, backend=cfg.backend), teacher, task, cfg.horizon, cfg.unroll, self.meta_opt,
            self.generator, cfg.clip, reduce=all_reduce_mean, finite_steps=self.finite_steps,
            label=f"imitation iteration {self.imitated + 1}",
        )

    def evaluate(self) -> dict[str, float]:
        """The current net's held-out scores (:meth:`Selection.evaluate <learnedopt.meta.selection.Selection.evaluate>`)."""
        return self.selection.evaluate(self.net)

    def train(self, time_budget: float | None = None) -> CoordinatewiseLSTM:
        """Run (or continue) training up to ``config.iterations``; returns the selected net.

        ``time_budget`` (seconds) ends training early, with a checkpoint that ``resume`` continues from. The loop
        (:class:`~learnedopt.meta.runs.RunLoop`) holds the folder, writes the last finished iteration as the
        checkpoint on ``KeyboardInterrupt``, and skips non-finite meta-steps
        (:class:`~learnedopt.meta.runs.FiniteSteps`); no file is written with non-finite weights.
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
        cfg, selection = self.config, self.selection
        while self.imitated < cfg.imitation and not run.out_of_time():
            mismatch = self.imitate()
            self.imitated += 1
            run.bar.set_postfix(imitation=f"{mismatch:.3g}")
            run.log("imitation/step_mismatch", mismatch, self.imitated)
            state = run.mark()
            if run.lead and self.imitated == cfg.imitation:
                self._save(state)
        if cfg.init_net and self.iteration == 0 and not selection.history and run.lead:
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
                advance = selection.stage_is_done(score)
            if cadence.evaluate and selection.has_next_stage and any_rank(advance, cfg.device):
                self._next_stage()
                run.log("curriculum/horizon", selection.horizon, self.iteration)
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
        if self.selection.record(self.iteration, meta_loss, scores):
            self._save_net("net.pt")
        return scores["eval/score"]

    def _next_stage(self) -> None:
        """Move to the next curriculum horizon, from the best weights so far (Chen et al. 2020)."""
        if rank_and_world()[0] == 0 and (self.out / "net.pt").is_file():
            self.net.load_state_dict(load_net(self.out / "net.pt").state_dict())
        broadcast_from_lead(list(self.net.parameters()))
        self.selection.next_stage()

    def _save_net(self, name: str) -> None:
        save_net(self.net, self.out / name, task=self.config.task, iteration=self.iteration,
                 best_held_out_score=self.selection.best_score, train_config=asdict(self.config),
                 history=self.selection.history)


def _check_family(family: TaskFamily, config: MetaTrainConfig) -> None:
    if not isinstance(family, TaskFamily):
        raise TypeError(f"family must be a task family (e.g. learnedopt.ModuleFamily), got {type(family).__name__}")
    family_device = getattr(family, "device", None)
    if family_device is not None and torch.device(family_device).type != torch.device(config.device).type:
        raise ValueError(f"the family's tasks live on {family_device} but device={config.device!r}: build the "
                         f"family with device={config.device!r} too")


def _estimator(cfg: MetaTrainConfig) -> GradientEstimator:
    if cfg.estimator == "tbptt":
        return TruncatedBackprop(second_order=cfg.second_order, checkpoint=cfg.checkpoint)
    return (AntitheticES if cfg.estimator == "es" else PersistentES)(cfg.es_pairs, cfg.es_sigma)


def _resumable(saved: dict[str, Any], config: MetaTrainConfig, path: Path) -> MetaTrainConfig:
    """The checkpoint's config, if ``config`` may continue it (every :meth:`MetaTrainConfig.must_match` field
    equal); else one ``ValueError`` naming the differences."""
    old = MetaTrainConfig(**_nested(saved))
    mismatched = [k for k in MetaTrainConfig.must_match() if getattr(old, k) != getattr(config, k)]
    if mismatched:
        details = ", ".join(f"{k}: saved {getattr(old, k)!r} vs now {getattr(config, k)!r}" for k in mismatched)
        raise ValueError(f"cannot resume {path}: the run was started with other settings ({details})")
    return old


def _nested(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config as :class:`MetaTrainConfig` fields. Checkpoints written before the net became a sub-config
    (those in ``results/meta-training/``, which their resume commands continue; they may also lack the
    ``imitated`` and ``finite_steps`` entries) keep the net's fields at the top."""
    flat = ("hidden_size", "num_layers", "output_scale", "inputs", "output")
    if "net" in saved:
        return saved
    net = {k: saved[k] for k in flat if k in saved}
    return {**{k: v for k, v in saved.items() if k not in flat}, "net": {**net}}


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
