"""Fair comparisons of update rules: tuned learning rates on tuning tasks, scores on separate test tasks.

Every optimizer is run through the same unroll engine on the same tasks, initial parameters and batches, so the
only difference between two curves is the update rule.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..rules import UpdateRule, adam, rmsprop, sgd
from .tasks import Task
from ..unroll import UnrollResult, unroll

__all__ = [
    "LR_GRID",
    "BASELINES",
    "TUNE_SEED",
    "TEST_SEED",
    "run_rule",
    "final_losses",
    "final_score",
    "tune_lr",
]

# Separate streams of tasks: learning rates and the shipped net are chosen on TUNE tasks, numbers are reported
# on TEST tasks. Meta-training samples its tasks from the user's --seed stream, which never equals these.
TUNE_SEED = 1_000_003
TEST_SEED = 2_000_003

LR_GRID: list[float] = [10 ** (-4 + 0.5 * i) for i in range(11)]  # 1e-4 ... 10 in half-decades

BASELINES: dict[str, Callable[[float], UpdateRule]] = {
    "Adam": lambda lr: adam(lr),
    "SGD": lambda lr: sgd(lr),
    "RMSprop": lambda lr: rmsprop(lr),
    "NAG": lambda lr: sgd(lr, momentum=0.9, nesterov=True),
}


def run_rule(task: Task, rule: UpdateRule, steps: int, init_seed: int) -> UnrollResult:
    """Run ``rule`` on ``task`` from initial parameters drawn with ``init_seed``, without meta-gradients.

    ``.losses`` is ``(steps + 1, num_tasks)``; ``.params`` the final parameters.
    """
    params = task.init_params(torch.Generator().manual_seed(init_seed))
    with torch.no_grad():
        return unroll(task.loss, params, rule, None, steps, task.batch)


def final_losses(task: Task, result: UnrollResult) -> Tensor:
    """Each task's final loss: on the task's fixed evaluation set where it has one (``task.eval_loss``, e.g. 10k
    MNIST training images), else at the last step; diverged runs (NaN/Inf) count as +Inf."""
    final = task.eval_loss(result.params) if hasattr(task, "eval_loss") else result.losses[-1]
    return torch.nan_to_num(final.detach().double().cpu(), nan=math.inf, posinf=math.inf)


def final_score(task: Task, result: UnrollResult) -> float:
    """Median of :func:`final_losses` over tasks: what tunes learning rates and selects nets."""
    return float(final_losses(task, result).median())


def tune_lr(
    task: Task,
    make_rule: Callable[[float], UpdateRule],
    steps: int,
    grid: list[float] = LR_GRID,
    init_seed: int = TUNE_SEED,
) -> tuple[float, dict[float, float]]:
    """Return the grid learning rate with the lowest median final loss on ``task``, and every score."""
    scores = {lr: final_score(task, run_rule(task, make_rule(lr), steps, init_seed)) for lr in grid}
    best = min(scores, key=lambda lr: (scores[lr], lr))
    return best, scores
