"""Saving and loading LSTM optimizer nets: packaged names or files, never unpickling code.

A net file is a plain dict of tensors and numbers, read with ``torch.load(..., weights_only=True)``::

    {"format": "learnedopt-net", "version": 1, "config": {...LSTMConfig...}, "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from .lstm import CoordinatewiseLSTM, LSTMConfig

__all__ = ["DEFAULT_NET", "list_pretrained", "load_net", "save_net", "net_info"]

PRETRAINED_DIR = Path(__file__).with_name("pretrained")
DEFAULT_NET = "mnist-lstm"
_FORMAT = "learnedopt-net"


def list_pretrained() -> list[str]:
    """Names of the nets shipped inside the package (usable as ``LearnedOptimizer(net=name)``)."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    text = os.fspath(name_or_path)
    if text in list_pretrained():
        return PRETRAINED_DIR / f"{text}.pt"
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / "net.pt").is_file():
        return path / "net.pt"
    raise ValueError(
        f"no packaged net or file named {text!r}. Packaged nets: {', '.join(list_pretrained()) or '(none)'}; "
        "otherwise pass the path of a net.pt written by `learnedopt meta-train` (or its run folder)."
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable learnedopt net file ({type(err).__name__}: {err})") from err
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a learnedopt net file (no '{_FORMAT}' header); was it written by save_net?")
    return blob


def net_info(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata saved with a net (how it was trained, on what), without building it."""
    blob = _read(_resolve(name_or_path))
    return {"config": blob["config"], **blob.get("meta", {})}


def load_net(name_or_path: str | os.PathLike[str]) -> CoordinatewiseLSTM:
    """Build a :class:`CoordinatewiseLSTM` from a packaged name, a ``net.pt`` file or a run folder.

    Raises ``ValueError`` for an unknown name (listing the packaged ones), a corrupt file, or weights that do not
    fit the saved architecture.

    Example:
        >>> import learnedopt
        >>> net = learnedopt.load_net("quadratic-lstm")
        >>> net.config.hidden_size
        20
    """
    path = _resolve(name_or_path)
    blob = _read(path)
    known = {f.name for f in fields(LSTMConfig)}
    config = blob.get("config")
    if not isinstance(config, dict) or not set(config) <= known:
        raise ValueError(f"{path} has an unknown architecture description {config!r}; expected keys {sorted(known)}")
    net = CoordinatewiseLSTM(LSTMConfig.from_dict(config))
    try:
        net.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"{path}: the weights do not match the saved LSTM architecture {config}: {err}") from err
    return net.eval()


def save_net(net: CoordinatewiseLSTM, path: str | os.PathLike[str], **meta: Any) -> Path:
    """Write ``net`` (float32, CPU) atomically to ``path`` with optional JSON-like ``meta`` data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": _FORMAT,
        "version": 1,
        "config": asdict(net.config),
        "state_dict": {k: v.detach().to("cpu", torch.float32).clone() for k, v in net.state_dict().items()},
        "meta": meta,
    }
    atomic_save(blob, path)
    return path


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
