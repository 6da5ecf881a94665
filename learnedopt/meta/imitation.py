"""Imitation warm start (Chen et al. 2020): fit the LSTM's steps to a hand-designed teacher's, without unrolling.

The teacher (e.g. Adam at its tuned learning rate) optimizes a task; at every step its gradient is also fed to the
LSTM rule, and the LSTM's step is regressed onto the teacher's. The parameters follow the teacher's trajectory, so
no meta-gradient flows through the optimization: cheap supervised learning that starts meta-training from a
competent optimizer.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..lstm import LSTMRule
from ..rules import UpdateRule
from .runs import FiniteSteps
from .tasks import Task

__all__ = ["imitation_step", "step_mismatch"]


def step_mismatch(student: Tensor, teacher: Tensor) -> Tensor:
    """Squared error of the student's step relative to the teacher's step size (scale-free across tensors)."""
    return ((student - teacher) ** 2).sum() / (teacher**2).sum().clamp_min(1e-30)


def imitation_step(
    rule: LSTMRule,
    teacher: UpdateRule,
    task: Task,
    steps: int,
    unroll: int,
    meta_opt: torch.optim.Optimizer,
    generator: torch.Generator,
    clip: float = 1.0,
    reduce: Callable[[list[Tensor]], None] | None = None,
    finite_steps: FiniteSteps | None = None,
    label: str = "imitation",
) -> float:
    """One imitation iteration: ``steps`` teacher steps on ``task``, one update of ``rule.net`` every ``unroll``.

    Returns the mean :func:`step_mismatch` per step and tensor. ``reduce`` (e.g. an all-reduce mean under
    ``torch.distributed``) is applied to the gradients of the net's weights before each update;
    ``finite_steps`` takes the updates, skipping non-finite ones (a fresh :class:`~learnedopt.meta.runs.FiniteSteps`
    by default; ``label`` names this call in its messages).

    Example:
        >>> import torch, learnedopt
        >>> data = (torch.randn(256, 4), torch.randn(256, 1))
        >>> family = learnedopt.ModuleFamily(lambda: torch.nn.Linear(4, 1), data, torch.nn.functional.mse_loss, 32)
        >>> net = learnedopt.CoordinatewiseLSTM(inputs="normalized", output="adam", output_scale=1e-3)
        >>> task = family.sample(4, torch.Generator().manual_seed(0))
        >>> opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        >>> err = imitation_step(learnedopt.LSTMRule(net), learnedopt.adam(3e-3), task, 20, 10, opt,
        ...                      torch.Generator().manual_seed(1))
    """
    params = task.init_params(generator)
    names = list(params)
    theta = [p.detach() for p in params.values()]
    teacher_state = teacher.init(theta)
    state = rule.init(theta)
    meta_params = list(rule.net.parameters())
    finite_steps = finite_steps or FiniteSteps()
    total, count = 0.0, 0
    for start in range(0, steps, unroll):
        loss = torch.zeros(())
        for t in range(start, min(start + unroll, steps)):
            with torch.enable_grad():
                leaves = [p.requires_grad_() for p in theta]
                grads = torch.autograd.grad(task.loss(dict(zip(names, leaves)), task.batch(t)).sum(), leaves)
            theta = [p.detach() for p in theta]
            with torch.no_grad():
                target, teacher_state = teacher.update(grads, teacher_state, theta)
            ours, state = rule.update(grads, state, theta)
            loss = loss + sum(step_mismatch(u, v) for u, v in zip(ours, target))
            count += len(theta)
            theta = [p + v for p, v in zip(theta, target)]
        meta_opt.zero_grad()
        loss.backward()
        mismatch = loss.detach().reshape(1)
        if reduce is not None:
            reduce([*(p.grad for p in meta_params if p.grad is not None), mismatch])
        finite_steps.step(meta_opt, meta_params, clip, mismatch, label)
        total += float(loss.detach())
        state = [{k: v.detach() for k, v in s.items()} for s in state]
    return total / max(count, 1)
