"""Datasets as whole tensors: load once, then sample batches by index (no per-step DataLoader overhead).

The data root is resolved in this order: an explicit ``data_dir`` (the ``--data-dir`` flag), the
``LEARNEDOPT_DATA`` environment variable, ``../shared/data`` beside the project (or the working directory) when
it exists, and finally ``~/.cache/learnedopt``, where torchvision downloads what it can when a network exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DataNotFoundError", "resolve_data_root", "candidate_roots", "MNIST", "load_mnist", "Omniglot", "load_omniglot"]

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
    roots: list[tuple[Path, str]] = []
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
        raise _not_found("MNIST", looked, error)

    def prepare(ds: TorchvisionMNIST) -> tuple[Tensor, Tensor]:
        images = (ds.data.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)).unsqueeze(1)
        return images.contiguous(), ds.targets.long()

    return MNIST(*prepare(train), *prepare(test))


@dataclass
class Omniglot:
    """All Omniglot characters as one tensor, resized once, with the names that the standard splits use."""

    images: Tensor  # (characters, 20, 28, 28) float32 in [0, 1], ink = 1
    names: list[str]  # "Alphabet/characterNN", aligned with images
    root: Path

    def split(self, name: str) -> list[tuple[int, int]]:
        """Classes of a Vinyals et al. split (``train``, ``val``, ``test``, ``trainval``): (character, rotation)."""
        path = self.root / "omniglot-splits" / "vinyals" / f"{name}.txt"
        if not path.is_file():
            raise DataNotFoundError(f"Omniglot split file {path} not found; expected the Vinyals et al. splits there")
        index = {n: i for i, n in enumerate(self.names)}
        classes = []
        for line in path.read_text().split():
            character, rotation = line.rsplit("/", 1)
            classes.append((index[character], int(rotation.removeprefix("rot")) // 90))
        return classes


def load_omniglot(data_dir: str | os.PathLike[str] | None = None, size: int = 28) -> Omniglot:
    """Load every Omniglot PNG under ``omniglot-py/images_{background,evaluation}`` at ``size`` x ``size``.

    The folders are read directly (torchvision's ``Omniglot`` insists on the original zips). The resized tensor is
    cached in ``~/.cache/learnedopt`` so later loads take well under a second.
    """
    looked = []
    for root, origin in candidate_roots(data_dir):
        base = root / "omniglot-py"
        looked.append(f"{base} ({origin})")
        if (base / "images_background").is_dir() and (base / "images_evaluation").is_dir():
            break
    else:
        raise _not_found("Omniglot", looked, None)
    folders = sorted(
        p for part in ("images_background", "images_evaluation") for p in (base / part).glob("*/*") if p.is_dir()
    )
    names = [f"{p.parent.name}/{p.name}" for p in folders]
    pngs = [sorted(folder.glob("*.png"))[:20] for folder in folders]
    short = [f"{folder} ({len(files)})" for folder, files in zip(folders, pngs) if len(files) < 20]
    if short:
        raise DataNotFoundError(f"Omniglot characters need 20 drawings each; these folders have fewer: {short[:3]}")
    # the cache is valid for these files only: the data root, every name and every file's size
    signature = [str(base.resolve()), sum(png.stat().st_size for files in pngs for png in files)]
    cache = CACHE_ROOT / f"omniglot-{size}.pt"
    if cache.is_file():
        cached = torch.load(cache, weights_only=True)
        if cached["names"] == names and cached.get("signature") == signature:
            return Omniglot(cached["images"].float() / 255.0, names, root)
    from PIL import Image

    images = torch.zeros(len(folders), 20, size, size, dtype=torch.uint8)
    for i, files in enumerate(pngs):
        for j, png in enumerate(files):
            with Image.open(png) as img:
                small = img.convert("L").resize((size, size), Image.Resampling.LANCZOS)
            # the PNGs draw ink in black on white; store ink as 1
            images[i, j] = 255 - torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(size, size)
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"names": names, "signature": signature, "images": images}, tmp)
    os.replace(tmp, cache)
    return Omniglot(images.float() / 255.0, names, root)
