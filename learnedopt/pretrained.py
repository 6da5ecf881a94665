"""Saving and loading LSTM optimizer nets: packaged names or files, never unpickling code.

A net file is a plain dict of tensors and numbers, read with ``torch.load(..., weights_only=True)``::

    {"format": "learnedopt-net", "version": 1, "config": {...LSTMConfig...}, "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from ._files import write_atomically
from .lstm import CoordinatewiseLSTM, LSTMConfig

__all__ = ["DEFAULT_NET", "list_pretrained", "load_net", "save_net", "net_info", "atomic_save", "load_file", "non_finite"]

PRETRAINED_DIR = Path(__file__).with_name("pretrained")
DEFAULT_NET = "general-lstm"
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
    blob = load_file(path, "learnedopt net file")
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a learnedopt net file (no '{_FORMAT}' header); was it written by save_net?")
    return blob


def net_info(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata saved with a net (how it was trained, on what), without building it."""
    blob = _read(_resolve(name_or_path))
    return {"config": blob["config"], **blob.get("meta", {})}


def load_net(name_or_path: str | os.PathLike[str]) -> CoordinatewiseLSTM:
    """Build a :class:`CoordinatewiseLSTM` from a packaged name, a ``net.pt`` file or a run folder.

    Raises ``ValueError`` (one line naming the file) for an unknown name (listing the packaged ones), a corrupt
    file, weights that do not fit the saved architecture (checked before anything is allocated), or NaN or
    infinite weights.

    Example:
        >>> import learnedopt
        >>> net = learnedopt.load_net("quadratic-lstm")
        >>> net.config.hidden_size
        20
    """
    path = _resolve(name_or_path)
    blob = _read(path)
    known = {f.name for f in fields(LSTMConfig)}
    config, weights = blob.get("config"), blob.get("state_dict")
    if not isinstance(config, dict) or not set(config) <= known:
        raise ValueError(f"{path} has an unknown architecture description {config!r}; expected keys {sorted(known)}")
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise ValueError(f"{path} holds no weights (its 'state_dict' is not a dict of tensors)")
    try:
        architecture = LSTMConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} describes an invalid LSTM: {err}") from None
    # the header's sizes may not exceed what the payload holds: a forged header must not allocate gigabytes
    largest = max((max(t.shape, default=1) for t in weights.values()), default=0)
    if architecture.num_layers > len(weights) or architecture.hidden_size > largest:
        raise ValueError(f"{path}: its weights do not match the architecture its header describes "
                         f"(hidden_size {architecture.hidden_size}, num_layers {architecture.num_layers}; the "
                         f"largest weight dimension is {largest}, over {len(weights)} tensors)")
    with torch.device("meta"):  # shapes only: nothing is allocated until the payload is known to fit
        net = CoordinatewiseLSTM(architecture)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        wrong = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
        raise ValueError(f"{path}: its weights do not match the architecture its header describes ({config}); "
                         f"first difference: {wrong[0]} ({expected.get(wrong[0])} expected, "
                         f"{found.get(wrong[0])} found)")
    bad = non_finite(weights)
    if bad:
        raise ValueError(f"{path} holds non-finite weights ({', '.join(bad)}): it cannot drive an optimizer; "
                         "use another net (learnedopt pretrained lists the packaged ones)")
    net.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, assign=True)
    return net.eval()


def non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors in ``weights`` holding NaN or an infinity."""
    return [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_net(net: CoordinatewiseLSTM, path: str | os.PathLike[str], **meta: Any) -> Path:
    """Write ``net`` (float32, CPU) atomically to ``path`` with optional JSON-like ``meta`` data.

    A net with NaN or infinite weights is refused (``ValueError``): no file ever holds one.
    """
    path = Path(path)
    bad = non_finite(net.state_dict())
    if bad:
        raise ValueError(f"not writing {path}: the net has non-finite weights ({', '.join(bad)})")
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


_DIGEST_KEY = "sha256"


def payload_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, and every other value's repr."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                visit(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                visit(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    visit(obj)
    return digest.hexdigest()


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` with a digest of the contents, written whole or not at all
    (:func:`~learnedopt._files.write_atomically`), so :func:`load_file` detects flipped bytes and a failed write
    leaves the previous file intact (one ``OSError`` line naming the file and the cause)."""
    buffer = io.BytesIO()  # serialized first: what reaches the disk is whole, and a write error keeps its errno
    torch.save({**obj, _DIGEST_KEY: payload_digest(obj)}, buffer)
    write_atomically(path, buffer.getbuffer())


def load_file(path: str | os.PathLike[str], kind: str) -> Any:
    """Read a file written by :func:`atomic_save` (or :func:`torch.save` of tensors and plain data) safely.

    Never unpickles code (``weights_only=True``), verifies the stored digest where there is one, and raises one
    ``ValueError`` line that names the file and ``kind`` (e.g. "meta-training checkpoint") instead of torch's text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated, corrupt or code-carrying files
        raise ValueError(
            f"{path} is not a readable {kind}: it is truncated, corrupt, or holds more than tensors and plain data "
            f"({type(err).__name__})"
        ) from None
    if isinstance(blob, dict) and _DIGEST_KEY in blob:
        stored = blob.pop(_DIGEST_KEY)
        if stored != payload_digest(blob):
            raise ValueError(f"{path} is corrupt: its contents do not match the digest stored in it")
    return blob
