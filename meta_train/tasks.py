"""The experiments' task families: the paper's quadratics and MNIST networks, and the ``--task`` registry.

The protocols and the building blocks users need for their own families (:class:`~learnedopt.meta.tasks.ModuleFamily`,
:class:`~learnedopt.meta.tasks.Mixture`, :class:`~learnedopt.meta.tasks.RescaledTask`) live in :mod:`learnedopt.meta.tasks`;
``--task package.module:factory`` loads a family of the user's own (:func:`family_from_path`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable

import torch
from torch import Tensor

from learnedopt.meta.tasks import Mixture, Params, TaskFamily

from .mnist import MNIST_VARIANTS, MNISTFamily
from .sequences import SEQUENCE_FAMILIES, resnet_family, sequence_family

__all__ = ["QuadraticTask", "QuadraticFamily", "FAMILIES", "GENERAL_MNIST", "get_family", "family_from_path"]


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
        return Mixture([MNISTFamily(v, data_dir, device=device) for v in variants], name=name)

    return build


# The broad training distribution of the general default net: MLPs of several widths, depths and activations,
# and a conv net. The drop-in benchmark (benchmarks/drop_in.py) uses none of these models. The 10-d quadratics
# are left out: tuned Adam takes steps of 0.3-1 there, beyond the default net's bounded step (<= 0.1), and their
# log-ratio to Adam swamped the selection score (54,637x at 300 steps in the first run: results/generalization.md).
GENERAL_MNIST = ("mnist-mlp", "mnist-mlp-relu", "mnist-mlp-tanh", "mnist-mlp-2layer", "mnist-conv")


def _general(data_dir: str | None = None, device: str = "cpu") -> TaskFamily:
    return Mixture([MNISTFamily(v, data_dir, device=device) for v in GENERAL_MNIST], name="general")


def _general_seq(data_dir: str | None = None, device: str = "cpu") -> TaskFamily:
    """``general`` plus what it lacks (issue 20): sequence models and a residual conv net with BatchNorm."""
    members: list[TaskFamily] = [MNISTFamily(v, data_dir, device=device) for v in GENERAL_MNIST]
    members += [sequence_family(name, device) for name in SEQUENCE_FAMILIES]
    members.append(resnet_family(data_dir, device))
    return Mixture(members, name="general-seq")


FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "quadratic": lambda data_dir=None, device="cpu": QuadraticFamily(device=device),  # no data needed
    **{v: _mnist_family((v,), v) for v in MNIST_VARIANTS},
    "mnist-mix": _mnist_family(("mnist-mlp", "mnist-mlp-relu"), "mnist-mix"),  # sigmoid and ReLU MLPs
    "mnist-all": _mnist_family(tuple(MNIST_VARIANTS), "mnist-all"),  # every variant of the study
    "general": _general,
    **{name: (lambda data_dir=None, device="cpu", name=name: sequence_family(name, device)) for name in SEQUENCE_FAMILIES},
    "mnist-resnet-bn": resnet_family,
    "general-seq": _general_seq,
}


def get_family(name: str, data_dir: str | None = None, device: str = "cpu") -> TaskFamily:
    """Build a task family (``--task``): a registered name, or ``package.module:factory`` (your own family).

    A factory is called with whichever of ``data_dir`` and ``device`` it accepts and must return a task family,
    e.g. a :class:`learnedopt.ModuleFamily`. An unknown name lists the known ones.
    """
    if ":" in name:
        return family_from_path(name, data_dir=data_dir, device=device)
    if name not in FAMILIES:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(FAMILIES)}, or give module:factory")
    return FAMILIES[name](data_dir=data_dir, device=device)


def family_from_path(path: str, **options: Any) -> TaskFamily:
    """Import ``package.module:factory`` (the working directory first on the path, as ``python -m`` has it), call
    it with the ``options`` its signature names, and check that it returned a task family."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--task {path!r}: write an import path as package.module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--task {path}: cannot import {module_name!r} ({err}); is it installed or in the working "
                         "directory?") from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise ValueError(f"--task {path}: module {module_name!r} has no attribute {attribute!r}")
    if not callable(factory):
        raise ValueError(f"--task {path}: {attribute!r} is a {type(factory).__name__}, not a function returning a "
                         "task family")
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    family = factory(**{k: v for k, v in options.items() if takes_any or k in accepted})
    if not isinstance(family, TaskFamily):
        raise ValueError(f"--task {path} returned a {type(family).__name__}, not a task family (an object with name, "
                         "default_meta_batch, default_eval_tasks, sample() and components(), e.g. "
                         "learnedopt.ModuleFamily)")
    return family
