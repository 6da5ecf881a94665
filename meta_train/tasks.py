"""Tasks are data: a batch of optimization problems with one functional loss, sampled from a family.

A :class:`Task` holds ``num_tasks`` problems at once (a leading task dimension on every parameter), so the
coordinatewise optimizer sees all of them as one batch of coordinates, and the loss returns one value per problem:
each problem's gradient is its own, unscaled.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from .mnist import MNIST_VARIANTS, MNISTFamily

Params = dict[str, Tensor]

__all__ = [
    "Task", "TaskFamily", "QuadraticTask", "QuadraticFamily", "Mixture", "RescaledTask", "FAMILIES", "get_family",
]


class Task(Protocol):
    """A batch of ``num_tasks`` problems: initial parameters, a loss and a deterministic batch for every step."""

    num_tasks: int
    device: torch.device

    def init_params(self, generator: torch.Generator) -> Params:
        """Sample initial parameters (each with a leading dimension of ``num_tasks``)."""
        ...

    def loss(self, params: Params, batch: Any) -> Tensor:
        """Return the ``(num_tasks,)`` losses of ``params`` on ``batch``."""
        ...

    def batch(self, step: int) -> Any:
        """The batch used at optimization step ``step``; the same for every optimizer evaluated on this task."""
        ...


class TaskFamily(Protocol):
    """A distribution over tasks, with the batch sizes that suit it."""

    name: str
    default_meta_batch: int
    default_eval_tasks: int

    def sample(self, num_tasks: int, generator: torch.Generator) -> Task:
        """Draw ``num_tasks`` problems as one batched :class:`Task`."""
        ...

    def components(self) -> Sequence["TaskFamily"]:
        """The families scored separately on held-out tasks: ``[self]``, or a mixture's members."""
        ...


class QuadraticTask:
    """``f(theta) = ||W theta - y||^2`` for a batch of ``W (n, d, d)`` and ``y (n, d)`` (paper, Section 3.1)."""

    def __init__(self, W: Tensor, y: Tensor, init_std: float = 0.01) -> None:
        self.W, self.y, self.init_std = W, y, init_std
        self.num_tasks = W.shape[0]
        self.device = W.device

    def init_params(self, generator: torch.Generator) -> Params:
        theta = torch.randn(self.y.shape, generator=generator, dtype=self.y.dtype) * self.init_std
        return {"theta": theta.to(self.device)}

    def loss(self, params: Params, batch: tuple[Tensor, Tensor] | None = None) -> Tensor:
        W, y = (self.W, self.y) if batch is None else batch
        residual = torch.einsum("nij,nj->ni", W, params["theta"]) - y
        return (residual * residual).sum(dim=-1)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The problem data itself (the same at every step): a shard of the tasks slices it like parameters."""
        return self.W, self.y


class QuadraticFamily:
    """10-dimensional random quadratics: ``W`` and ``y`` with i.i.d. N(0, 1) entries, ``theta_0 ~ N(0, 0.01^2)``.

    Example:
        >>> import torch
        >>> task = QuadraticFamily().sample(4, torch.Generator().manual_seed(0))
        >>> task.loss(task.init_params(torch.Generator().manual_seed(1))).shape
        torch.Size([4])
    """

    name = "quadratic"
    default_meta_batch = 128
    default_eval_tasks = 256

    def __init__(
        self, dim: int = 10, init_std: float = 0.01, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> None:
        self.dim, self.init_std, self.dtype, self.device = dim, init_std, dtype, torch.device(device)

    def sample(self, num_tasks: int, generator: torch.Generator) -> QuadraticTask:
        W = torch.randn(num_tasks, self.dim, self.dim, generator=generator, dtype=self.dtype)
        y = torch.randn(num_tasks, self.dim, generator=generator, dtype=self.dtype)
        return QuadraticTask(W.to(self.device), y.to(self.device), self.init_std)

    def components(self) -> list["QuadraticFamily"]:
        return [self]


class Mixture:
    """Each sampled task batch comes from one member family, drawn uniformly; members are scored separately.

    Example:
        >>> import torch
        >>> mix = Mixture([QuadraticFamily(dim=3), QuadraticFamily(dim=5)], name="two-quadratics")
        >>> [f.dim for f in mix.components()], mix.sample(2, torch.Generator().manual_seed(0)).num_tasks
        ([3, 5], 2)
    """

    def __init__(self, families: Sequence[TaskFamily], name: str) -> None:
        if not families:
            raise ValueError("a mixture needs at least one family")
        self.name = name
        self.families = list(families)
        self.default_meta_batch = min(f.default_meta_batch for f in self.families)
        self.default_eval_tasks = min(f.default_eval_tasks for f in self.families)

    def components(self) -> list[TaskFamily]:
        return self.families

    def sample(self, num_tasks: int, generator: torch.Generator) -> Task:
        pick = int(torch.randint(0, len(self.families), (1,), generator=generator))
        return self.families[pick].sample(num_tasks, generator)


class RescaledTask:
    """Random objective rescaling (Lv et al. 2017): optimize ``f(c * theta)`` from ``theta_0 / c``.

    ``c = exp(U(-log_range, log_range))`` is drawn per coordinate when the initial parameters are drawn, so a rule
    cannot rely on the absolute scale of gradients or parameters; the loss values are those of the original task.
    """

    def __init__(self, task: Task, log_range: float) -> None:
        self.task, self.log_range = task, log_range
        self.num_tasks, self.device = task.num_tasks, task.device
        self.scales: Params = {}

    def init_params(self, generator: torch.Generator) -> Params:
        params = self.task.init_params(generator)
        self.scales = {
            k: torch.exp((2 * torch.rand(v.shape, generator=generator) - 1) * self.log_range).to(v)
            for k, v in params.items()
        }
        return {k: v / self.scales[k] for k, v in params.items()}

    def loss(self, params: Params, batch: Any) -> Tensor:
        return self.task.loss({k: v * self.scales[k] for k, v in params.items()}, batch)

    def batch(self, step: int) -> Any:
        return self.task.batch(step)


def _mnist_family(variants: tuple[str, ...], name: str) -> Callable[..., TaskFamily]:
    def build(data_dir: str | None = None, device: str = "cpu") -> TaskFamily:
        if len(variants) == 1:
            return MNISTFamily(variants[0], data_dir, device=device)
        return Mixture([MNISTFamily(v, data_dir, device=device) for v in variants], name=name)

    return build


# The broad training distribution of the general default net: MLPs of several widths, depths and activations,
# and a conv net. The drop-in benchmark (benchmarks/drop_in.py) uses none of these models. The 10-d quadratics
# are left out: tuned Adam takes steps of 0.3-1 there, beyond the default net's bounded step (<= 0.1), and their
# log-ratio to Adam swamped the selection score (54,637x at 300 steps in the first run: results/generalization.md).
GENERAL_MNIST = ("mnist-mlp", "mnist-mlp-relu", "mnist-mlp-tanh", "mnist-mlp-2layer", "mnist-conv")


def _general(data_dir: str | None = None, device: str = "cpu") -> TaskFamily:
    return Mixture([MNISTFamily(v, data_dir, device=device) for v in GENERAL_MNIST], name="general")


FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "quadratic": lambda data_dir=None, device="cpu": QuadraticFamily(device=device),  # no data needed
    **{v: _mnist_family((v,), v) for v in MNIST_VARIANTS},
    "mnist-mix": _mnist_family(("mnist-mlp", "mnist-mlp-relu"), "mnist-mix"),  # sigmoid and ReLU MLPs
    "mnist-all": _mnist_family(tuple(MNIST_VARIANTS), "mnist-all"),  # every variant of the study
    "general": _general,
}


def get_family(name: str, data_dir: str | None = None, device: str = "cpu") -> TaskFamily:
    """Build a task family by name (``--task``); an unknown name lists the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name](data_dir=data_dir, device=device)
