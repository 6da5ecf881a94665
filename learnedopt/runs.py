"""What keeps a training run's folder whole: one process at a time, a resume point on Ctrl-C, and meta-steps that
never take a non-finite gradient.

Meta-training (:class:`~learnedopt.MetaTrainer`) and few-shot training (``baselines.train``) both hold their
folder with :func:`hold_run_folder`, keep a resume point with :class:`ResumePoint`, and step their
meta-optimizer through a :class:`FiniteSteps`. Checkpoint files themselves are written by
:func:`learnedopt.pretrained.atomic_save`: a unique temporary file, synced, then renamed, so a full disk or a
crash leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import copy
import os
import shlex
import socket
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected against a second process
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunFolderInUse", "RunInterrupted", "MetaTrainingDiverged", "hold_run_folder", "ResumePoint",
           "FiniteSteps"]

LOCK_NAME = ".lock"


class RunFolderInUse(OSError):
    """Another process is running in this folder (the message names it)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM under the command line) stopped a run after its resume point was written."""

    def __init__(self, folder: Path, iteration: int) -> None:
        super().__init__(f"interrupted at iteration {iteration}; continue with --resume (resume point in "
                         f"{folder / 'checkpoint.pt'})")
        self.folder, self.iteration = folder, iteration


class MetaTrainingDiverged(RuntimeError):
    """Too many meta-steps in a row had non-finite meta-gradients."""


@contextmanager
def hold_run_folder(folder: Path, lead: bool = True) -> Iterator[None]:
    """Hold ``folder`` for this process while the block runs; another process holding it is refused at once.

    The lock is an advisory ``flock`` on ``folder/.lock``, released by the kernel when the process ends however
    it ends, so a crashed run never leaves a stale lock. Under ``torch.distributed`` only the lead rank (the one
    that writes files) takes it. Raises :class:`RunFolderInUse` naming the other process.
    """
    if not lead or fcntl is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise RunFolderInUse(f"{folder} is in use by {holder}; wait for that run to end, or choose another "
                                 "--out") from None
        os.ftruncate(fd, 0)
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({command})\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


class ResumePoint:
    """A copy of a run's whole state at the last iteration boundary, written as the checkpoint if the run is
    interrupted there or mid-iteration: the resumed run then continues bit-identically.

    ``capture`` returns the state dict the run's checkpoint holds; ``write`` saves such a dict.
    """

    def __init__(self, folder: Path, capture: Callable[[], dict[str, Any]],
                 write: Callable[[dict[str, Any]], None], lead: bool = True) -> None:
        self.folder, self._capture, self._write, self.lead = folder, capture, write, lead
        self.state: dict[str, Any] | None = None

    def mark(self) -> dict[str, Any]:
        """Record the state now (an iteration boundary); returns it (tensors copied, nothing shared)."""
        self.state = copy.deepcopy(self._capture())
        return self.state

    @contextmanager
    def written_on_interrupt(self) -> Iterator[None]:
        """On ``KeyboardInterrupt`` inside the block, write the last mark as the checkpoint and raise
        :class:`RunInterrupted`."""
        try:
            yield
        except KeyboardInterrupt:
            if self.state is None:
                raise
            if self.lead:
                self._write(self.state)
            raise RunInterrupted(self.folder, int(self.state["iteration"])) from None


class FiniteSteps:
    """The meta-optimizer's step, skipped (and counted) where the meta-gradient or meta-loss is not finite.

    One NaN from a task (a model that outputs NaN on some batch, an overflowing loss) would otherwise reach every
    weight of the net through Adam. A skipped step is counted in ``skipped`` and said once as a warning;
    ``limit`` skips in a row stop the run with :class:`MetaTrainingDiverged`. Every rank sees the same averaged
    gradients, so every rank skips the same steps.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> steps = FiniteSteps(limit=3)
        >>> for p in net.parameters():
        ...     p.grad = torch.full_like(p, float("nan"))
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     steps.step(opt, list(net.parameters()), clip=1.0, loss=0.5, where="iteration 1")
        False
        >>> steps.skipped
        1
    """

    def __init__(self, limit: int = 20, skipped: int = 0, in_a_row: int = 0) -> None:
        if limit < 1:
            raise ValueError(f"the limit of skipped meta-steps in a row must be >= 1, got {limit}")
        self.limit, self.skipped, self.in_a_row = limit, skipped, in_a_row
        self._warned = False

    def step(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], clip: float, loss: float | Tensor,
             where: str) -> bool:
        """Clip the gradients of ``params`` and step ``optimizer``; return whether it stepped. ``where`` names the
        step in messages (e.g. ``"iteration 12"``)."""
        grads = [p.grad for p in params if p.grad is not None]
        checks = [torch.isfinite(torch.as_tensor(loss, dtype=torch.float64)).all().cpu()]
        checks += [torch.isfinite(g).all().cpu() for g in grads]
        if bool(torch.stack(checks).all()):
            self.in_a_row = 0
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            return True
        for p in params:
            p.grad = None
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise MetaTrainingDiverged(
                f"meta-training diverged at {where}: {self.in_a_row} meta-steps in a row had "
                "non-finite meta-gradients (the net was not changed by them; the last checkpoint holds the run "
                "before them). Check the task's loss for NaN, or lower --meta-lr")
        if not self._warned:
            self._warned = True
            warnings.warn(f"learnedopt: skipped a meta-step at {where}: its meta-gradient or "
                          "meta-loss is not finite (NaN or Inf from a task?); skipped steps are counted in "
                          "TensorBoard's meta/skipped_steps", stacklevel=2)
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}
