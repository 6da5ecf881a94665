"""The C kernel's interface in one typed place: its compile-time constants, its argument structs and the layout
of its ``scalars[]`` array, each mirroring a definition in ``lstm_kernel.c`` (kept in step by
``tests/test_kernel.py``, which runs every entry point against the torch ops)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Build", "StepArgs", "CellForward", "CellBackward", "step_scalars", "padded", "MAX_DECAYS"]

VECTOR = 16  # floats per padded row of the kernel's gate matrices
MAX_DECAYS = 8  # momentum decays the scalars[] layout has room for


def padded(width: int) -> int:
    """``width`` rounded up to whole 16-float vectors (the kernel's padded rows)."""
    return -(-width // VECTOR) * VECTOR


@dataclass(frozen=True)
class Build:
    """The compile-time constants of one library (``-D`` flags of ``lstm_kernel.c``): a net's sizes and maps."""

    hidden: int  # H
    layers: int  # LAYERS
    decays: int  # NK: momentum decays
    paper: bool  # PAPER: the paper's log/sign inputs (else the normalized moments)
    adam: bool  # ADAM: the bounded Adam-modulating output (else linear)
    outputs: int  # OUT: the head's outputs
    bf16_state: bool = False  # BF16: the hidden state is stored as bfloat16

    def defines(self) -> tuple[tuple[str, int], ...]:
        """The ``-D`` constants, sorted (also the build's cache key)."""
        values = {"H": self.hidden, "LAYERS": self.layers, "NK": self.decays, "PAPER": int(self.paper),
                  "ADAM": int(self.adam), "OUT": self.outputs, "BF16": int(self.bf16_state),
                  "GP": padded(4 * self.hidden)}
        return tuple(sorted(values.items()))


class StepArgs(ctypes.Structure):
    """``args_t``: one tensor's in-place step (addresses of contiguous tensors)."""

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


# scalars[] of lstm_kernel.c: enum { S_BETA2, S_BIAS2, S_OUTPUT_SCALE, S_LOG_RANGE, S_P, S_THRESHOLD, S_EXP_P,
# S_DECAYS, S_BIAS1 = S_DECAYS + 8 }
S_BETA2, S_BIAS2, S_OUTPUT_SCALE, S_LOG_RANGE, S_P, S_THRESHOLD, S_EXP_P, S_DECAYS = range(8)
S_BIAS1 = S_DECAYS + MAX_DECAYS
S_COUNT = S_BIAS1 + MAX_DECAYS


def step_scalars(
    *, beta2: float, bias2: Tensor | float, output_scale: float, log_range: float, p: float, threshold: float,
    exp_p: float, decays: Tensor, bias1: Tensor | None,
) -> Tensor:
    """The float32 ``scalars[]`` of one step: the net's constants and this step's bias corrections (``bias2``,
    ``bias1``), which the caller computes as the torch ops round them."""
    values = torch.zeros(S_COUNT, dtype=torch.float32)
    for index, value in ((S_BETA2, beta2), (S_BIAS2, bias2), (S_OUTPUT_SCALE, output_scale),
                         (S_LOG_RANGE, log_range), (S_P, p), (S_THRESHOLD, threshold), (S_EXP_P, exp_p)):
        values[index] = value
    values[S_DECAYS : S_DECAYS + len(decays)] = decays
    if bias1 is not None:
        values[S_BIAS1 : S_BIAS1 + len(bias1)] = bias1
    return values
