"""Where datasets live: one data-root convention for the experiments, the examples and users' scripts.

The data root is resolved in this order: an explicit ``data_dir`` (the ``--data-dir`` flag), the
``LEARNEDOPT_DATA`` environment variable, ``../shared/data`` beside the source checkout (only when running from
one: an installed wheel has no project folder) or beside the working directory, when it exists, and finally
``~/.cache/learnedopt``, where torchvision downloads what it can when a network exists.
"""

from __future__ import annotations

import os
from pathlib import Path


__all__ = ["CACHE_ROOT", "DataNotFoundError", "candidate_roots", "resolve_data_root", "data_not_found"]

_CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root when running from a source checkout
CACHE_ROOT = Path("~/.cache/learnedopt").expanduser()


class DataNotFoundError(FileNotFoundError):
    """A dataset is in none of the places looked at, and could not be downloaded."""


def candidate_roots(data_dir: str | os.PathLike[str] | None = None) -> list[tuple[Path, str]]:
    """Every root that would be tried, with where it came from, in order of precedence."""
    if data_dir is not None:
        return [(Path(data_dir).expanduser(), "--data-dir")]
    if os.environ.get("LEARNEDOPT_DATA"):
        return [(Path(os.environ["LEARNEDOPT_DATA"]).expanduser(), "LEARNEDOPT_DATA")]
    roots: list[tuple[Path, str]] = []
    bases = ([_CHECKOUT] if (_CHECKOUT / "pyproject.toml").is_file() else []) + [Path.cwd()]
    for base in bases:
        shared = (base / ".." / "shared" / "data").resolve()
        if shared.is_dir() and all(shared != r for r, _ in roots):
            roots.append((shared, "../shared/data"))
    roots.append((CACHE_ROOT, "default cache"))
    return roots


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root to use: the first of :func:`candidate_roots`."""
    return candidate_roots(data_dir)[0][0]


def data_not_found(name: str, looked: list[str], err: Exception | None) -> DataNotFoundError:
    """The error for a dataset found in none of ``looked``, saying how to point at it."""
    why = f" (download failed: {err})" if err else ""
    return DataNotFoundError(
        f"{name} not found{why}. Looked in: {'; '.join(looked)}. Fix: pass --data-dir DIR (or set "
        f"LEARNEDOPT_DATA=DIR) where DIR holds the torchvision layout, e.g. DIR/MNIST/raw/, or run once with "
        f"network access so torchvision can download it into {CACHE_ROOT}."
    )
