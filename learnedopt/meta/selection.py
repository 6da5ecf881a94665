"""Selecting the net on held-out tuning tasks, and the curriculum that the held-out scores drive.

Scores are final losses against tuned Adam, not the meta-loss, which would favour early progress over the final
loss (Chen et al. 2020 select the same way); a curriculum stage ends once its best score has not improved for
``patience`` evaluations.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..lstm import CoordinatewiseLSTM, LSTMRule
from .config import MetaTrainConfig
from .evaluation import BASELINES, TUNE_SEED, final_score, run_rule, tune_lr
from .tasks import Task, TaskFamily

__all__ = ["Selection"]


class Selection:
    """Held-out scores and their history, the best score so far, Adam's tuned rates and scores, the curriculum's
    stage.

    :meth:`state_dict` is what a checkpoint keeps of it (the keys ``best_score``, ``adam_lrs``, ``adam_scores``,
    ``history`` and ``curriculum``). Adam's runs on the tuning tasks are deterministic, so each is run once (in its
    learning-rate search) and its score kept: an evaluation then runs only the net.
    """

    def __init__(self, family: TaskFamily, config: MetaTrainConfig) -> None:
        self.family, self.config = family, config
        self.best_score = math.inf
        self.adam_lrs: dict[str, float] = {}
        self.adam_scores: dict[str, float] = {}  # tuned Adam's score per f"{family}@{steps}"
        self.history: list[dict[str, float]] = []
        self.stage = 0  # index into (horizon, *curriculum)
        self.stage_best = math.inf
        self.stale = 0  # evaluations since the stage's score last improved

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "adam_lrs": self.adam_lrs, "adam_scores": self.adam_scores,
                "history": self.history,
                "curriculum": {"stage": self.stage, "stage_best": self.stage_best, "stale": self.stale}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.adam_lrs, self.history = state["best_score"], state["adam_lrs"], state["history"]
        self.adam_scores = state.get("adam_scores", {})  # checkpoints from before the scores were kept: rerun once
        stage = state["curriculum"]
        self.stage, self.stage_best, self.stale = stage["stage"], stage["stage_best"], stage["stale"]

    @property
    def horizon(self) -> int:
        """The training horizon of the current curriculum stage."""
        return (self.config.horizon, *self.config.curriculum)[self.stage]

    @property
    def has_next_stage(self) -> bool:
        return self.stage < len(self.config.curriculum)

    def eval_lengths(self) -> tuple[int, ...]:
        """Run lengths scored on held-out tasks: ``eval_lengths``, else the first horizon, twice it, and the
        curriculum's last horizon."""
        cfg = self.config
        lengths = cfg.eval_lengths or (cfg.horizon, 2 * cfg.horizon, *cfg.curriculum[-1:])
        return tuple(sorted(set(lengths)))

    def _tuning_task(self, family: TaskFamily) -> Task:
        return family.sample(self.config.eval_tasks, torch.Generator().manual_seed(TUNE_SEED))

    def adam_lr(self, family: TaskFamily, steps: int) -> float:
        """Adam's best learning rate for ``family`` at ``steps``, tuned once on the tuning tasks and cached."""
        key = f"{family.name}@{steps}"
        if key not in self.adam_lrs:
            task = self._tuning_task(family)
            self.adam_lrs[key], scores = tune_lr(task, BASELINES["Adam"], steps)
            self.adam_scores[key] = scores[self.adam_lrs[key]]
        return self.adam_lrs[key]

    def adam_score(self, family: TaskFamily, steps: int) -> float:
        """Tuned Adam's median final loss on ``family``'s tuning tasks after ``steps``, computed once."""
        key = f"{family.name}@{steps}"
        lr = self.adam_lr(family, steps)  # a new search records the score too
        if key not in self.adam_scores:  # the rate came from a checkpoint that kept no scores
            task = self._tuning_task(family)
            self.adam_scores[key] = final_score(task, run_rule(task, BASELINES["Adam"](lr), steps, TUNE_SEED))
        return self.adam_scores[key]

    def evaluate(self, net: CoordinatewiseLSTM) -> dict[str, float]:
        """Score ``net`` against tuned Adam on held-out tuning tasks.

        For each component family (one, or each member of a mixture) and each run length L: the ratio of the
        net's median final loss to that of Adam at its best learning rate for L. ``eval/score``, the mean
        log-ratio, selects ``net.pt``: it rewards the final loss, also beyond the horizon trained on.
        """
        rule = LSTMRule(net, backend=self.config.backend)
        scores: dict[str, float] = {}
        log_ratios = []
        for family in self.family.components():
            task = self._tuning_task(family)
            for steps in self.eval_lengths():
                key = f"{family.name}@{steps}"
                lstm = final_score(task, run_rule(task, rule, steps, TUNE_SEED))
                adam = self.adam_score(family, steps)
                scores[f"eval/lstm_final_loss/{key}"] = lstm
                scores[f"eval/ratio_to_adam/{key}"] = lstm / adam
                log_ratios.append(math.log(lstm / adam) if lstm > 0 and math.isfinite(lstm) else math.inf)
        scores["eval/score"] = sum(log_ratios) / len(log_ratios)
        return scores

    def record(self, iteration: int, meta_loss: float, scores: dict[str, float]) -> bool:
        """Add an evaluation to the history; return whether it is the best so far."""
        self.history.append({"iteration": iteration, "horizon": self.horizon, "meta_loss": meta_loss, **scores})
        if scores["eval/score"] < self.best_score:
            self.best_score = scores["eval/score"]
            return True
        return False

    def stage_is_done(self, score: float) -> bool:
        """Track the stage's best held-out score; true once it has not improved for ``patience`` evaluations."""
        if score < self.stage_best:
            self.stage_best, self.stale = score, 0
        else:
            self.stale += 1
        return self.stale >= self.config.patience

    def next_stage(self) -> None:
        self.stage += 1
        self.stage_best, self.stale = math.inf, 0
