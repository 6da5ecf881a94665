"""The one run loop of every training run, and what keeps a run's folder whole: one process at a time, a resume
point on Ctrl-C, and meta-steps that never take a non-finite gradient.

Meta-training (:class:`~learnedopt.MetaTrainer`) and few-shot training (``baselines.train``) both run inside a
:class:`RunLoop`: it holds the folder (:func:`hold_run_folder`), shows the progress bar, writes TensorBoard logs
on the lead rank, keeps the time budget on every rank, says when to evaluate and checkpoint, and keeps a
:class:`ResumePoint`. Meta-optimizers step through a :class:`FiniteSteps`. Checkpoint files themselves are
written by :func:`learnedopt.pretrained.atomic_save`: a unique temporary file, synced, then renamed, so a full
disk or a crash leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import copy
import math
import os
import shlex
import socket
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .distributed import any_rank, rank_and_world

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected against a second process
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLoop", "Cadence", "RunFolderInUse", "RunInterrupted", "MetaTrainingDiverged", "hold_run_folder",
           "ResumePoint", "FiniteSteps"]

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


@dataclass(frozen=True)
class Cadence:
    """What the iteration that just finished calls for."""

    evaluate: bool  # every ``eval_every`` iterations, and at the last (final, or out of time)
    checkpoint: bool  # every ``checkpoint_every`` iterations, and at the last
    out_of_time: bool


class RunLoop:
    """The skeleton every training run shares, as a context manager around the run's own iterations.

    Entering holds ``folder`` for this process, opens the progress bar and (lead rank) TensorBoard in
    ``folder/tb``, and marks the first resume point. After each iteration's work, :meth:`finished` advances the
    bar, logs the iteration's seconds, checks the time budget on every rank (so all ranks stop together) and
    returns the :class:`Cadence`; :meth:`end` then marks the iteration's resume point and, where the cadence
    says, saves it as the checkpoint. A ``KeyboardInterrupt`` inside the block writes the last resume point and
    raises :class:`RunInterrupted`. ``state`` returns the run's checkpoint dict; ``save`` writes one.

    Example:
        >>> import tempfile
        >>> saved = []
        >>> run = RunLoop(Path(tempfile.mkdtemp()), iterations=4, eval_every=2, checkpoint_every=4,
        ...               state=lambda: {"iteration": len(saved)}, save=saved.append, progress=False)
        >>> with run:
        ...     for iteration in range(1, 5):
        ...         cadence = run.finished(iteration)
        ...         run.end(cadence)
        >>> cadence, len(saved)
        (Cadence(evaluate=True, checkpoint=True, out_of_time=False), 1)
    """

    def __init__(self, folder: Path, *, iterations: int, eval_every: int, checkpoint_every: int,
                 state: Callable[[], dict[str, Any]], save: Callable[[dict[str, Any]], None],
                 time_budget: float | None = None, start: int = 0, progress: bool = True, desc: str = "train",
                 device: str | torch.device = "cpu") -> None:
        self.folder, self.iterations, self.start = folder, iterations, start
        self.eval_every, self.checkpoint_every, self.time_budget = eval_every, checkpoint_every, time_budget
        self.progress, self.desc, self.device, self.save = progress, desc, device, save
        self.lead = rank_and_world()[0] == 0  # the lead rank alone writes files and logs
        self.resume_point = ResumePoint(folder, state, save, self.lead)
        self.writer: Any = None
        self._stack = ExitStack()

    def __enter__(self) -> "RunLoop":
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        stack = self._stack
        try:
            stack.enter_context(hold_run_folder(self.folder, self.lead))
            if self.lead:
                self.writer = SummaryWriter(str(self.folder / "tb"))
                stack.callback(self.writer.close)
            self.bar = tqdm(total=self.iterations, initial=self.start, disable=not (self.progress and self.lead),
                            desc=self.desc, unit="it")
            stack.callback(self.bar.close)
            stack.enter_context(self.resume_point.written_on_interrupt())  # unwound first: closes, then unlocks
            self.resume_point.mark()
        except BaseException:
            stack.close()
            raise
        self.deadline = math.inf if self.time_budget is None else time.perf_counter() + self.time_budget
        self._started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        return bool(self._stack.__exit__(kind, error, traceback))

    def out_of_time(self) -> bool:
        """Whether the time budget is spent (on this rank; :meth:`finished` agrees across ranks)."""
        return time.perf_counter() >= self.deadline

    def finished(self, iteration: int, **postfix: str) -> Cadence:
        """Iteration ``iteration`` (counted from 1) did its work: what now (``postfix`` goes to the bar)."""
        out_of_time = any_rank(self.out_of_time(), self.device)
        self.bar.update()
        if postfix:
            self.bar.set_postfix(**postfix)
        self.log("seconds_per_iteration", time.perf_counter() - self._started, iteration)
        last = iteration >= self.iterations or out_of_time
        return Cadence(evaluate=iteration % self.eval_every == 0 or last,
                       checkpoint=iteration % self.checkpoint_every == 0 or last, out_of_time=out_of_time)

    def log(self, tag: str, value: float, iteration: int) -> None:
        """A scalar for TensorBoard (lead rank)."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, iteration)

    def mark(self) -> dict[str, Any]:
        """A resume point now (between iterations); returns its state."""
        return self.resume_point.mark()

    def end(self, cadence: Cadence) -> None:
        """The iteration's end: its resume point, saved as the checkpoint where ``cadence`` says."""
        state = self.mark()
        if cadence.checkpoint and self.lead:
            self.save(state)
        self._started = time.perf_counter()


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
        device = grads[0].device if grads else None
        checks = [torch.isfinite(torch.as_tensor(loss, device=device)).all(), *(torch.isfinite(g).all() for g in grads)]
        if bool(torch.stack(checks).all()):  # one host sync for the whole check
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
