"""One LSTM cell of the differentiable path (meta-training on GPUs) as a Triton forward and backward.

The twin of :class:`~learnedopt.lstm.cell.FusedCell` (and of the C kernel's ``cell_forward``/``cell_backward``):
the forward writes ``h'`` and ``c'`` and keeps nothing but its inputs; the backward recomputes the gates in
registers, writes the gradients of the input, the state and (per block, summed afterwards) the gate weights.
Tested against the op-by-op reference under Triton's CPU interpreter (``tests/test_triton_step.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .triton_step import kernel_module, padded_width, split_gate_weight, triton_available

__all__ = ["TritonCell", "triton_cell_applies"]

BLOCK = 64


def triton_cell_applies(*tensors: Tensor) -> bool:
    """Whether :class:`TritonCell` runs these tensors: float32 CUDA ones (or CPU ones under the interpreter)."""
    return all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in tensors) and (
        triton_available(tensors[0].device) is None and tensors[0].device.type == "cuda")


class TritonCell(torch.autograd.Function):
    """``(weight, x, h, c) -> (h', c')`` as one Triton kernel each way. First-order only, as ``FusedCell``."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        n, width = x.shape
        hidden = h.shape[1]
        hp = padded_width(hidden, width)
        tiles = split_gate_weight(weight, width, hp)
        x, h, c = x.contiguous(), h.contiguous(), c.contiguous()
        new_h, new_c = torch.empty_like(h), torch.empty_like(c)
        if n:
            kernel_module().cell_forward_kernel[(-(-n // BLOCK),)](x, h, c, *tiles, new_h, new_c, n, width, H=hidden,
                                                                  HP=hp, BLOCK=BLOCK)
        ctx.save_for_backward(x, h, c, *tiles)
        ctx.shape = (n, width, hidden, hp, weight.shape)
        return new_h, new_c

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_h: Tensor, grad_c: Tensor) -> tuple[Tensor | None, ...]:
        x, h, c, wx, wh, bias = ctx.saved_tensors
        n, width, hidden, hp, weight_shape = ctx.shape
        programs = max(-(-n // BLOCK), 1)
        grad_x, grad_h_old, grad_c_old = torch.zeros_like(x), torch.zeros_like(h), torch.zeros_like(c)
        partial_wx = x.new_zeros(programs, 4, hp, hp)
        partial_wh = x.new_zeros(programs, 4, hp, hp)
        partial_b = x.new_zeros(programs, 4, hp)
        if n:
            kernel_module().cell_backward_kernel[(programs,)](
                x, h, c, wx, wh, bias, grad_h.contiguous(), grad_c.contiguous(), grad_x, grad_h_old, grad_c_old,
                partial_wx, partial_wh, partial_b, n, width, H=hidden, HP=hp, BLOCK=BLOCK)
        gwx, gwh, gb = partial_wx.sum(0), partial_wh.sum(0), partial_b.sum(0)
        grad_weight = x.new_empty(weight_shape).reshape(4, hidden, -1)
        grad_weight[:, :, :width] = gwx[:, :width, :hidden].transpose(1, 2)
        grad_weight[:, :, width : width + hidden] = gwh[:, :hidden, :hidden].transpose(1, 2)
        grad_weight[:, :, -1] = gb[:, :hidden]
        return grad_weight.reshape(weight_shape), grad_x, grad_h_old, grad_c_old
