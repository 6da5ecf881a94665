"""The fused CPU kernel of the LSTM optimizer: built at first use, cached, optional.

``_lstm_kernel.c`` runs a whole in-place LSTM optimizer step (features, every layer, head, output map) per
block of coordinates that stays in cache, ~3x faster than the torch ops on a CPU (``benchmarks/step.py``), and
the differentiable LSTM cell's forward and backward for meta-training (``benchmarks/meta_train_cost.py``).
It is compiled with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``), for this CPU
(``-march=native``) and with the net's sizes as constants, in well under a second, then loaded with
:mod:`ctypes`: no torch headers, no ninja, nothing to build at install. The library is cached under
``$LEARNEDOPT_KERNEL_CACHE`` (default ``~/.cache/learnedopt/kernels``), keyed by the source, the flags and this
CPU's model and feature flags, so a home directory shared by different machines never loads
code built for another CPU. Where no compiler exists or the build fails, :func:`load` says why once and the
optimizer runs its torch ops, which are also the reference the kernel is tested against (``tests/test_kernel.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["KernelUnavailable", "StepArgs", "CellForward", "CellBackward", "load", "cache_dir"]

SOURCE = Path(__file__).with_name("_lstm_kernel.c")
_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
_LIBRARIES: dict[tuple[tuple[str, int], ...], ctypes.CDLL | KernelUnavailable] = {}
_LOCK = threading.Lock()


class KernelUnavailable(RuntimeError):
    """The fused kernel cannot be built or loaded here (the message says why and what to do)."""


class StepArgs(ctypes.Structure):
    """``args_t`` of ``_lstm_kernel.c``: one tensor's pointers (addresses of contiguous tensors)."""

    _fields_ = [("n", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("grad", "h", "c", "m", "v", "update", "weights", "head", "scalars")
    ]


class CellForward(ctypes.Structure):
    """``cell_forward_t``: one LSTM cell's forward on the differentiable path (contiguous float32 tensors)."""

    _fields_ = [("n", ctypes.c_int64), ("width", ctypes.c_int64), ("outputs", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("x", "h", "c", "weights", "head", "new_h", "new_c", "raw")
    ]


class CellBackward(ctypes.Structure):
    """``cell_backward_t``: that cell's backward (the output pointers may be null)."""

    _fields_ = [("n", ctypes.c_int64), ("width", ctypes.c_int64), ("outputs", ctypes.c_int64)] + [
        (name, ctypes.c_void_p)
        for name in ("grad_h", "grad_h2", "grad_c", "head", "grad_raw", "grad_head", "x", "h", "c", "weights",
                     "weight_rows", "grad_weight", "grad_x", "grad_h_old", "grad_c_old")
    ]


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$LEARNEDOPT_KERNEL_CACHE``, else ``~/.cache/learnedopt/kernels``."""
    configured = os.environ.get("LEARNEDOPT_KERNEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "learnedopt" / "kernels"


def _cpu_identity() -> str:
    """The CPU's model and feature flags: code built with ``-march=native`` runs only where these match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags", "Features", "CPU part"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()} {platform.platform()}"


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    raise KernelUnavailable("no C compiler found (set $CC, or install gcc or clang)")


def _build(defines: tuple[tuple[str, int], ...]) -> Path:
    source = SOURCE.read_bytes()
    flags = [*_FLAGS, *(f"-D{name}={value}" for name, value in defines)]
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), _cpu_identity().encode()]))
    target = cache_dir() / f"lstm_step_{key.hexdigest()[:20]}.so"
    if target.exists():  # built before on this CPU: no compiler needed
        return target
    compiler = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for arch in (["-march=native"], []):  # some compilers (older clang on ARM) reject -march=native
        fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        command = [compiler, *arch, *flags, "-o", scratch, str(SOURCE), "-lpthread", "-lm"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            done, errors = None, [*errors, str(err)]
        if done is not None and done.returncode == 0:
            os.replace(scratch, target)  # atomic: concurrent processes never load a half-written library
            return target
        os.unlink(scratch)
        if done is not None:
            errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    raise KernelUnavailable(f"compiling {SOURCE.name} with {compiler} failed: {errors[-1]}")


def load(**defines: int) -> ctypes.CDLL:
    """The kernel library for these compile-time constants (``H``, ``LAYERS``, ``NK``, ``PAPER``, ``ADAM``,
    ``OUT``, ``BF16``, ``GP``), built on first use and cached; raises :class:`KernelUnavailable` (every call, with
    the first failure's reason) where it cannot be built.

    Example:
        >>> lib = load(H=20, LAYERS=2, NK=3, PAPER=0, ADAM=1, OUT=2, BF16=0, GP=80)  # doctest: +SKIP
    """
    key = tuple(sorted(defines.items()))
    with _LOCK:
        if key not in _LIBRARIES:
            try:
                library = ctypes.CDLL(str(_build(key)))
                library.lstm_step.argtypes = [ctypes.POINTER(StepArgs), ctypes.c_int]
                library.lstm_step.restype = ctypes.c_int64
                if not defines.get("BF16"):  # the cell's forward and backward exist in float32-state builds
                    library.cell_forward.argtypes = [ctypes.POINTER(CellForward)]
                    library.cell_forward.restype = None
                    library.cell_backward.argtypes = [ctypes.POINTER(CellBackward)]
                    library.cell_backward.restype = None
                _LIBRARIES[key] = library
            except (KernelUnavailable, OSError) as err:
                failure = err if isinstance(err, KernelUnavailable) else KernelUnavailable(f"loading failed: {err}")
                warnings.warn(f"learnedopt: the fused CPU step is unavailable ({failure}); using torch ops, "
                              "which give the same results more slowly", stacklevel=3)
                _LIBRARIES[key] = failure
        found = _LIBRARIES[key]
    if isinstance(found, KernelUnavailable):
        raise found
    return found
