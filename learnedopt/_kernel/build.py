"""Building, caching and loading the C kernel of the LSTM optimizer: at first use, optional.

``lstm_kernel.c`` runs a whole in-place LSTM optimizer step (features, every layer, head, output map) per
block of coordinates that stays in cache, and the differentiable LSTM cell's forward and backward for
meta-training (their speed against the torch ops: ``benchmarks/step.py``, ``benchmarks/meta_train_cost.py``).
It is compiled with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``), for this CPU
(``-march=native``) and with the net's sizes as constants, once per net architecture, then loaded with
:mod:`ctypes`: no torch headers, no ninja, nothing to build at install. The library is cached under
``$LEARNEDOPT_KERNEL_CACHE`` (default ``~/.cache/learnedopt/kernels``), keyed by the source, the flags and this
CPU's model and feature flags, so a home directory shared by different machines never loads
code built for another CPU. Where no compiler exists or the build fails, :func:`load` says why once and the
optimizer runs its torch ops, which are also the reference the kernel is tested against (``tests/test_kernel.py``).

Loading a shared library runs its code, so the cache is treated as pip and ssh treat theirs: the folder is
created ``0700``; a folder that another user owns or could write to is never loaded from (one warning, then a
private temporary folder for this process); and a library is loaded only if it is this user's, writable by
nobody else, and byte for byte the one whose SHA-256 and build identity were recorded beside it when it was
built. Anything else (a planted file, garbage, another build) is rebuilt, into a unique temporary file renamed
into place atomically (``tests/test_kernel_cache.py``).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from .._files import write_atomically
from .abi import Build, CellBackward, CellForward, StepArgs

__all__ = ["KernelUnavailable", "load", "cache_dir"]

SOURCE = Path(__file__).with_name("lstm_kernel.c")
_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
_LIBRARIES: dict[tuple[tuple[str, int], ...], ctypes.CDLL | KernelUnavailable] = {}
_LOCK = threading.Lock()


class KernelUnavailable(RuntimeError):
    """The fused kernel cannot be built or loaded here (the message says why and what to do)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$LEARNEDOPT_KERNEL_CACHE``, else ``~/.cache/learnedopt/kernels``.

    The folder is created ``0700``. A library is loaded from it only while the folder is private (owned by this
    user, writable by nobody else, under parents that nobody else can rename it in) and the library file is
    exactly the one this package built there (its SHA-256 and build identity match the manifest written beside
    it). Otherwise the kernel is built into a private temporary folder for this process, with one warning.
    """
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


def _not_private(path: Path, leaf: bool) -> str | None:
    """Why another user could replace what ``path`` holds (``None``: they cannot), as ssh's StrictModes judges a
    key file's folders: the folder itself (``leaf``) must be this user's and writable by nobody else; a parent
    must be this user's or root's and, if others may write it, sticky (as ``/tmp``), so nobody can rename it."""
    info = path.stat()
    user = os.geteuid()
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a folder"
    if info.st_uid != user and (leaf or info.st_uid != 0):
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {user})"
    writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and (leaf or not info.st_mode & stat.S_ISVTX):
        return f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _make_private(folder: Path) -> None:
    """Create ``folder`` and its missing parents with mode ``0700`` (whatever the umask)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # another process created it at the same moment
            continue
        path.chmod(0o700)


def _unsafe_reason(folder: Path) -> str | None:
    """Why ``folder`` may not hold libraries this process loads (``None``: it may)."""
    real = folder.resolve()
    for path in (real, *real.parents):
        reason = _not_private(path, leaf=path == real)
        if reason is not None:
            return reason
    return None


_PRIVATE: list[Path] = []  # this process's fallback folder, created on first need and removed at exit


def _library_folder() -> Path:
    """:func:`cache_dir`, created private; or, where it is not private, a fresh private temporary folder."""
    folder = cache_dir()
    try:
        _make_private(folder)
        reason = _unsafe_reason(folder)
    except OSError as err:
        reason = f"{folder} cannot be used ({err.strerror or err})"
    if reason is None:
        return folder
    if not _PRIVATE:
        _PRIVATE.append(Path(tempfile.mkdtemp(prefix="learnedopt-kernels-")))
        atexit.register(shutil.rmtree, _PRIVATE[0], ignore_errors=True)
        warnings.warn(f"learnedopt: not loading compiled kernels from {folder}: {reason}. Building them in the "
                      f"private folder {_PRIVATE[0]} for this process instead; make the cache yours alone "
                      f"(chmod 700 {folder}) or set $LEARNEDOPT_KERNEL_CACHE to keep them", stacklevel=4)
    return _PRIVATE[0]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _identity(defines: tuple[tuple[str, int], ...]) -> dict[str, str]:
    """What a library is built from: the source's digest, the flags with the net's sizes, this CPU."""
    flags = [*_FLAGS, *(f"-D{name}={value}" for name, value in defines)]
    return {
        "source_sha256": _digest(SOURCE.read_bytes()),
        "flags": " ".join(flags),
        "cpu_sha256": _digest(_cpu_identity().encode()),
    }


def _cached(library: Path, identity: dict[str, str]) -> bytes | None:
    """The bytes of ``library`` if it is a regular file of this user's, writable by nobody else, whose bytes and
    build identity match the manifest written beside it when it was built; ``None`` for anything else."""
    try:
        info = library.lstat()
        manifest = json.loads(library.with_suffix(".json").read_text())
        data = library.read_bytes()
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        warnings.warn(f"learnedopt: not loading {library}: it is not a regular file of this user's that only this "
                      f"user can write (owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); rebuilding "
                      "it", stacklevel=5)
        return None
    genuine = (isinstance(manifest, dict) and manifest.get("identity") == identity
               and manifest.get("library_sha256") == _digest(data))
    return data if genuine else None


def _library_path(folder: Path, identity: dict[str, str]) -> Path:
    key = _digest(json.dumps(identity, sort_keys=True).encode())[:20]
    return folder / f"lstm_step_{key}.so"


def _build(folder: Path, identity: dict[str, str]) -> bytes:
    """The library's bytes: cached, or compiled into a unique temporary file that is renamed into place
    atomically with its manifest (concurrent processes never see a half-written library)."""
    target = _library_path(folder, identity)
    cached = _cached(target, identity)
    if cached is not None:  # built before on this CPU: no compiler needed
        return cached
    compiler = _compiler()
    errors: list[str] = []
    for arch in (["-march=native"], []):  # some compilers (older clang on ARM) reject -march=native
        fd, scratch = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=folder)
        os.close(fd)
        command = [compiler, *arch, *identity["flags"].split(), "-o", scratch, str(SOURCE), "-lpthread", "-lm"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            done, errors = None, [*errors, str(err)]
        if done is not None and done.returncode == 0:
            os.chmod(scratch, 0o700)
            data = Path(scratch).read_bytes()
            manifest = {"identity": identity, "library_sha256": _digest(data), "compiler": " ".join([compiler, *arch])}
            os.replace(scratch, target)
            write_atomically(target.with_suffix(".json"), json.dumps(manifest, indent=1).encode(), private=True)
            return data
        os.unlink(scratch)
        if done is not None:
            errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    raise KernelUnavailable(f"compiling {SOURCE.name} with {compiler} failed: {errors[-1]}")


def _open(defines: tuple[tuple[str, int], ...]) -> ctypes.CDLL:
    """Build (or find) and load the library, with its entry points typed.

    What is loaded is a fresh private copy of the very bytes that were verified, so nothing can swap the file
    between the check and the load; a cached library that does not load is rebuilt once.
    """
    folder, identity = _library_folder(), _identity(defines)
    for attempt in range(2):
        data = _build(folder, identity)
        fd, copy = tempfile.mkstemp(prefix=".loading-", suffix=".so", dir=folder)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
        except OSError as err:  # a full disk: the cached library itself is fine
            os.unlink(copy)
            raise KernelUnavailable(f"cannot write a private copy of the library in {folder}: {err}") from None
        try:
            library = ctypes.CDLL(copy)
            library.lstm_step.argtypes = [ctypes.POINTER(StepArgs), ctypes.c_int]
            library.lstm_step.restype = ctypes.c_int64
            if not dict(defines).get("BF16"):  # the cell's forward and backward exist in float32-state builds
                library.cell_forward.argtypes = [ctypes.POINTER(CellForward)]
                library.cell_forward.restype = None
                library.cell_backward.argtypes = [ctypes.POINTER(CellBackward)]
                library.cell_backward.restype = None
            return library
        except (OSError, AttributeError) as err:
            if attempt:
                raise KernelUnavailable(f"loading the library built in {folder} failed: {err}") from None
            _library_path(folder, identity).with_suffix(".json").unlink(missing_ok=True)  # not loadable: rebuild
        finally:
            os.unlink(copy)  # the loaded mapping stays valid
    raise AssertionError("unreachable")


def load(build: Build) -> ctypes.CDLL:
    """The kernel library for ``build``'s compile-time constants, built on first use and cached; raises
    :class:`KernelUnavailable` (every call, with the first failure's reason) where it cannot be built.

    Example:
        >>> lib = load(Build(hidden=20, layers=2, decays=3, paper=False, adam=True, outputs=2))  # doctest: +SKIP
    """
    key = build.defines()
    with _LOCK:
        if key not in _LIBRARIES:
            try:
                _LIBRARIES[key] = _open(key)
            except (KernelUnavailable, OSError) as err:
                failure = err if isinstance(err, KernelUnavailable) else KernelUnavailable(f"building failed: {err}")
                warnings.warn(f"learnedopt: the fused CPU step is unavailable ({failure}); using torch ops, "
                              "which give the same results more slowly", stacklevel=3)
                _LIBRARIES[key] = failure
        found = _LIBRARIES[key]
    if isinstance(found, KernelUnavailable):
        raise found
    return found
