"""MNIST optimizees (Andrychowicz et al. 2016, Section 3.2 and Figure 5) as batched task families.

A task batch holds ``n`` independently initialized copies of one small network; each copy sees its own
minibatch sequence. All copies run in one call through ``torch.func.vmap`` over ``functional_call``, so any
``nn.Module`` can be an optimizee and the coordinatewise optimizer sees every copy's coordinates as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from learnedopt.data import MNIST, load_mnist

__all__ = ["MNIST_VARIANTS", "mnist_model", "MNISTTask", "MNISTFamily"]

Params = dict[str, Tensor]

@dataclass(frozen=True)
class Variant:
    """An MNIST optimizee: an MLP with these hidden layers and activation, or the small conv net."""

    hidden: tuple[int, ...] = (20,)
    activation: str = "sigmoid"
    conv: bool = False


# The paper's base MLP is one hidden layer of 20 sigmoid units; the others are its Figure 5 rows, plus a conv net.
MNIST_VARIANTS: dict[str, Variant] = {
    "mnist-mlp": Variant(),
    "mnist-mlp-40": Variant(hidden=(40,)),
    "mnist-mlp-2layer": Variant(hidden=(20, 20)),
    "mnist-mlp-relu": Variant(activation="relu"),
    "mnist-conv": Variant(conv=True),
    "mnist-mlp-tanh": Variant(hidden=(32,), activation="tanh"),
}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def mnist_model(variant: str) -> nn.Module:
    """A freshly initialized network for ``variant`` (see :data:`MNIST_VARIANTS`)."""
    spec = MNIST_VARIANTS[variant]
    if spec.conv:
        # A small conv net the paper never tried: 2 strided 3x3 convolutions, then a linear classifier.
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
        )
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[spec.activation]()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


@lru_cache(maxsize=2)
def _mnist(data_dir: str | None, device: str) -> MNIST:
    data = load_mnist(data_dir)
    return MNIST(*(t.to(device) for t in (data.train_images, data.train_labels, data.test_images, data.test_labels)))


@lru_cache(maxsize=4)
def _eval_subset(size: int, examples: int) -> Tensor:
    """The fixed evaluation subset of the training set (the same for every task, optimizer and run)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(0))[:examples]


class MNISTTask:
    """``num_tasks`` copies of an MNIST classifier; ``loss`` is each copy's mean cross-entropy on its minibatch."""

    def __init__(self, variant: str, data: MNIST, num_tasks: int, batch_seed: int, batch_size: int = 128) -> None:
        self.variant, self.data, self.num_tasks = variant, data, num_tasks
        self.device = data.train_images.device
        self.batch_seed, self.batch_size = batch_seed, batch_size
        self.template = mnist_model(variant).to("meta")

        def one_loss(params: Params, images: Tensor, labels: Tensor) -> Tensor:
            logits = functional_call(self.template, params, (images,))
            return nn.functional.cross_entropy(logits, labels)

        def one_logits(params: Params, images: Tensor) -> Tensor:
            return functional_call(self.template, params, (images,))

        self._losses = vmap(one_loss)
        self._logits = vmap(one_logits, in_dims=(0, None))

    def init_params(self, generator: torch.Generator) -> Params:
        seeds = torch.randint(0, 2**62, (self.num_tasks,), generator=generator).tolist()
        models = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                models.append(mnist_model(self.variant))
        params, _ = stack_module_state(models)
        return {k: v.detach().to(self.device) for k, v in params.items()}

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Minibatch indices for ``step``: a pure function of the task's seed and the step."""
        g = torch.Generator().manual_seed(self.batch_seed * 1_000_003 + step)
        index = torch.randint(0, len(self.data.train_labels), (self.num_tasks, self.batch_size), generator=g)
        index = index.to(self.device)
        return self.data.train_images[index], self.data.train_labels[index]

    def loss(self, params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = batch
        return self._losses(params, images, labels)

    @torch.no_grad()
    def eval_loss(self, params: Params, examples: int = 10_000, chunk: int = 2500) -> Tensor:
        """Each copy's mean cross-entropy on a fixed subset of ``examples`` training images, ``(num_tasks,)``.

        Scores the final parameters on the same data for every optimizer: the loss of one last minibatch of 128
        is noisy enough to reorder optimizers.
        """
        params = {k: v.detach() for k, v in params.items()}
        fixed = _eval_subset(len(self.data.train_labels), examples).to(self.device)
        total = torch.zeros(self.num_tasks, device=self.device)
        for start in range(0, len(fixed), chunk):
            index = fixed[start : start + chunk]
            logits = self._logits(params, self.data.train_images[index])
            labels = self.data.train_labels[index].expand(self.num_tasks, -1)
            total += nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(
                self.num_tasks, -1
            ).sum(-1)
        return total.cpu() / len(fixed)

    @torch.no_grad()
    def test_accuracy(self, params: Params, chunk: int = 2500) -> Tensor:
        """Accuracy of each copy on the 10,000 test images, ``(num_tasks,)``."""
        params = {k: v.detach() for k, v in params.items()}
        correct = torch.zeros(self.num_tasks, device=self.device)
        for start in range(0, len(self.data.test_labels), chunk):
            images = self.data.test_images[start : start + chunk]
            labels = self.data.test_labels[start : start + chunk]
            correct += (self._logits(params, images).argmax(-1) == labels).sum(-1).float()
        return correct.cpu() / len(self.data.test_labels)


class MNISTFamily:
    """Tasks of one MNIST variant: random initializations and minibatch orders of the same network."""

    default_meta_batch = 8
    default_eval_tasks = 8

    def __init__(
        self, variant: str = "mnist-mlp", data_dir: str | None = None, batch_size: int = 128, device: str = "cpu"
    ) -> None:
        if variant not in MNIST_VARIANTS:
            raise ValueError(f"unknown MNIST variant {variant!r}; choose one of {', '.join(MNIST_VARIANTS)}")
        self.name, self.variant, self.data_dir, self.batch_size = variant, variant, data_dir, batch_size
        self.device = str(device)

    @property
    def data(self) -> MNIST:
        return _mnist(self.data_dir, self.device)

    def components(self) -> list["MNISTFamily"]:
        return [self]

    def sample(self, num_tasks: int, generator: torch.Generator) -> MNISTTask:
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        return MNISTTask(self.variant, self.data, num_tasks, seed, self.batch_size)
