"""MNIST optimizees (Andrychowicz et al. 2016, Section 3.2 and Figure 5) as task families, and MNIST itself.

Each variant is a :class:`learnedopt.ModuleFamily`: a task batch holds ``n`` independently initialized copies of
one small network, each with its own minibatch sequence, run in one call under ``torch.func.vmap``. MNIST is
loaded once as whole tensors (batches are indexed, not drawn through a ``DataLoader``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

import torch
from torch import Tensor, nn

from learnedopt_experiments.data import CACHE_ROOT, candidate_roots, data_not_found
from learnedopt.meta.tasks import ModuleFamily, ModuleTask, Params

__all__ = ["MNIST", "load_mnist", "MNIST_VARIANTS", "mnist_model", "MNISTTask", "MNISTFamily"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


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


@dataclass
class MNIST:
    """MNIST as four tensors, images normalized with the usual mean 0.1307 and std 0.3081."""

    train_images: Tensor  # (60000, 1, 28, 28) float32
    train_labels: Tensor  # (60000,) int64
    test_images: Tensor  # (10000, 1, 28, 28)
    test_labels: Tensor


def load_mnist(data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> MNIST:
    """Load MNIST from the resolved data root; download into it only when it is the default cache.

    Example:
        >>> mnist = load_mnist()
        >>> mnist.train_images.shape
        torch.Size([60000, 1, 28, 28])
    """
    from torchvision.datasets import MNIST as TorchvisionMNIST

    looked, error = [], None
    for root, origin in candidate_roots(data_dir):
        looked.append(f"{root / 'MNIST' / 'raw'} ({origin})")
        try:
            train = TorchvisionMNIST(str(root), train=True, download=False)
            test = TorchvisionMNIST(str(root), train=False, download=False)
            break
        except RuntimeError:
            if not (download and root == CACHE_ROOT):
                continue
        try:
            train = TorchvisionMNIST(str(root), train=True, download=True)
            test = TorchvisionMNIST(str(root), train=False, download=True)
            break
        except Exception as err:  # no network, a proxy error, a bad checksum...
            error = err
    else:
        raise data_not_found("MNIST", looked, error)

    def prepare(ds: TorchvisionMNIST) -> tuple[Tensor, Tensor]:
        images = (ds.data.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)).unsqueeze(1)
        return images.contiguous(), ds.targets.long()

    return MNIST(*prepare(train), *prepare(test))


@lru_cache(maxsize=2)
def _mnist(data_dir: str | None, device: str) -> MNIST:
    data = load_mnist(data_dir)
    return MNIST(*(t.to(device) for t in (data.train_images, data.train_labels, data.test_images, data.test_labels)))


class MNISTTask(ModuleTask):
    """``num_tasks`` copies of an MNIST classifier; ``loss`` is each copy's mean cross-entropy on its minibatch."""

    family: "MNISTFamily"

    @torch.no_grad()
    def test_accuracy(self, params: Params, chunk: int = 2500) -> Tensor:
        """Accuracy of each copy on the 10,000 test images, ``(num_tasks,)``."""
        params = {k: v.detach() for k, v in params.items()}
        images, labels = self.family.test_data
        correct = torch.zeros(self.num_tasks, device=self.device)
        for start in range(0, len(labels), chunk):
            batch = images[start : start + chunk].expand(self.num_tasks, *images[start : start + chunk].shape)
            correct += (self.family.forward(params, batch).argmax(-1) == labels[start : start + chunk]).sum(-1).float()
        return correct.cpu() / len(labels)


class MNISTFamily(ModuleFamily):
    """Tasks of one MNIST variant: random initializations and minibatch orders of the same network."""

    task_type = MNISTTask

    def __init__(
        self, variant: str = "mnist-mlp", data_dir: str | None = None, batch_size: int = 128, device: str = "cpu"
    ) -> None:
        if variant not in MNIST_VARIANTS:
            raise ValueError(f"unknown MNIST variant {variant!r}; choose one of {', '.join(MNIST_VARIANTS)}")
        data = _mnist(data_dir, str(device))
        super().__init__(
            partial(mnist_model, variant), (data.train_images, data.train_labels), nn.functional.cross_entropy,
            batch_size, name=variant, device=device, batched=True,
        )
        self.variant = variant
        self.test_data = (data.test_images, data.test_labels)
