"""Datasets as whole tensors: load once, then sample batches by index (no per-step DataLoader overhead).

The data root is resolved in this order: an explicit ``data_dir`` (the ``--data-dir`` flag), the
``LEARNEDOPT_DATA`` environment variable, ``../shared/data`` beside the project (or the working directory) when
it exists, and finally ``~/.cache/learnedopt``, where torchvision downloads what it can when a network exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

__all__ = ["DataNotFoundError", "resolve_data_root", "candidate_roots", "MNIST", "load_mnist"]

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path("~/.cache/learnedopt").expanduser()
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class DataNotFoundError(FileNotFoundError):
    """A dataset is in none of the places looked at, and could not be downloaded."""


def candidate_roots(data_dir: str | os.PathLike[str] | None = None) -> list[tuple[Path, str]]:
    """Every root that would be tried, with where it came from, in order of precedence."""
    if data_dir is not None:
        return [(Path(data_dir).expanduser(), "--data-dir")]
    if os.environ.get("LEARNEDOPT_DATA"):
        return [(Path(os.environ["LEARNEDOPT_DATA"]).expanduser(), "LEARNEDOPT_DATA")]
    roots = []
    for base in (_PROJECT_ROOT, Path.cwd()):
        shared = (base / ".." / "shared" / "data").resolve()
        if shared.is_dir() and all(shared != r for r, _ in roots):
            roots.append((shared, "../shared/data"))
    roots.append((CACHE_ROOT, "default cache"))
    return roots


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root to use: the first of :func:`candidate_roots`."""
    return candidate_roots(data_dir)[0][0]


def _not_found(name: str, looked: list[str], err: Exception | None) -> DataNotFoundError:
    why = f" (download failed: {err})" if err else ""
    return DataNotFoundError(
        f"{name} not found{why}. Looked in: {'; '.join(looked)}. Fix: pass --data-dir DIR (or set "
        f"LEARNEDOPT_DATA=DIR) where DIR holds the torchvision layout, e.g. DIR/MNIST/raw/, or run once with "
        f"network access so torchvision can download it into {CACHE_ROOT}."
    )


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
        >>> mnist = load_mnist()  # doctest: +SKIP
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
        raise _not_found("MNIST", looked, error)

    def prepare(ds: TorchvisionMNIST) -> tuple[Tensor, Tensor]:
        images = (ds.data.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)).unsqueeze(1)
        return images.contiguous(), ds.targets.long()

    return MNIST(*prepare(train), *prepare(test))
