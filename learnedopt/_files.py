"""Whole-or-nothing file writes, shared by net files, checkpoints and the kernel cache."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, data: bytes | memoryview, *, private: bool = False) -> None:
    """Write ``data`` to a unique temporary file beside ``path``, sync it to disk and rename it over ``path``: a
    crash, a full disk or a second writer never leaves a half-written file or a leftover.

    The file gets the umask's permissions, as ``open`` would give it (``private``: ``0600``). A failed write
    raises ``OSError`` with one line naming the file and the cause (``errno`` kept); the previous file is intact.
    """
    fd, scratch = _create_unique(path, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, path)
    except BaseException as err:
        Path(scratch).unlink(missing_ok=True)
        if isinstance(err, OSError):
            full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            failure = OSError(f"could not write {path}: {err.strerror or err}; the previous {path.name} is "
                              f"unchanged{' (free some space, then continue with --resume)' if full else ''}")
            failure.errno = err.errno
            raise failure from None
        raise
    _sync_folder(path.parent)


def _create_unique(path: Path, mode: int) -> tuple[int, str]:
    """A new file beside ``path`` with a name no other writer uses."""
    while True:
        scratch = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), str(scratch)
        except FileExistsError:
            continue


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
