"""Tasks are data: a batch of optimization problems with one functional loss, sampled from a family.

A :class:`Task` holds ``num_tasks`` problems at once (a leading task dimension on every parameter), so the
coordinatewise optimizer sees all of them as one batch of coordinates, and the loss returns one value per problem:
each problem's gradient is its own, unscaled.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from .mnist import MNIST_VARIANTS, MNISTFamily, MNISTMixture

Params = dict[str, Tensor]

__all__ = ["Task", "TaskFamily", "QuadraticTask", "QuadraticFamily", "FAMILIES", "get_family"]


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


def _mnist_family(variants: tuple[str, ...], name: str) -> Callable[..., TaskFamily]:
    def build(data_dir: str | None = None, device: str = "cpu") -> TaskFamily:
        if len(variants) == 1:
            return MNISTFamily(variants[0], data_dir, device=device)
        return MNISTMixture(variants, data_dir, name=name, device=device)

    return build


FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "quadratic": lambda data_dir=None, device="cpu": QuadraticFamily(device=device),  # no data needed
    **{v: _mnist_family((v,), v) for v in MNIST_VARIANTS},
    "mnist-mix": _mnist_family(("mnist-mlp", "mnist-mlp-relu"), "mnist-mix"),  # sigmoid and ReLU MLPs
    "mnist-all": _mnist_family(tuple(MNIST_VARIANTS), "mnist-all"),  # every variant of the study
}


def get_family(name: str, data_dir: str | None = None, device: str = "cpu") -> TaskFamily:
    """Build a task family by name (``--task``); an unknown name lists the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name](data_dir=data_dir, device=device)
