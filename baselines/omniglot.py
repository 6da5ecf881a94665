"""Omniglot as one tensor: every character's 20 drawings, resized once and cached (load once, index episodes).

The folders ``omniglot-py/images_{background,evaluation}`` under the data root are read directly (torchvision's
``Omniglot`` insists on the original zips); the Vinyals et al. splits come from ``omniglot-splits/vinyals``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from learnedopt._files import write_atomically
from learnedopt_experiments.data import CACHE_ROOT, DataNotFoundError, candidate_roots, data_not_found

__all__ = ["Omniglot", "load_omniglot"]


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
        raise data_not_found("Omniglot", looked, None)
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
    # a unique temporary name: two runs started together both build the cache, and neither may fail
    buffer = io.BytesIO()
    torch.save({"names": names, "signature": signature, "images": images}, buffer)
    write_atomically(cache, buffer.getbuffer())
    return Omniglot(images.float() / 255.0, names, root)
