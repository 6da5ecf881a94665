"""The optional C kernel: its source (``lstm_kernel.c``), its typed interface (:mod:`.abi`) and the build cache
that compiles it for this CPU at first use (:mod:`.build`). Private: :mod:`learnedopt.lstm` is its one user."""

from .abi import Build, CellBackward, CellForward, StepArgs, padded, step_scalars
from .build import KernelUnavailable, cache_dir, load

__all__ = ["Build", "CellBackward", "CellForward", "KernelUnavailable", "StepArgs", "cache_dir", "load", "padded",
           "step_scalars"]
