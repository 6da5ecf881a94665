"""``output="adam"``'s map from the head's raw outputs to a bounded modulation of the nominal Adam step, and its
one-node autograd twin."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["bounded_adam_step", "BoundedAdamStep"]


def bounded_adam_step(
    raw: Tensor, nominal: Tensor, seen: Tensor, log_range: float, scale: float
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``output="adam"``'s map (the one copy of its math) and what its backward needs."""
    tanh_magnitude, tanh_offset = torch.tanh(raw[:, 0]), torch.tanh(raw[:, 1])
    magnitude = torch.exp(log_range * tanh_magnitude)
    clipped = nominal.clamp(-1.0, 1.0)
    step = magnitude * clipped - tanh_offset
    return torch.where(seen, step * -scale, 0.0), (tanh_magnitude, tanh_offset, magnitude, clipped)


class BoundedAdamStep(torch.autograd.Function):
    """:func:`bounded_adam_step` as one autograd node: its backward is a few elementwise ops writing the raw
    outputs' gradient as one ``(N, 2)`` tensor, where autograd's record walks a node per op and zero-fills an
    ``(N, 2)`` gradient for each column it selects.
    First-order only, as :class:`~learnedopt.lstm.cell.FusedCell`."""

    @staticmethod
    def forward(ctx: Any, raw: Tensor, nominal: Tensor, seen: Tensor, log_range: float, scale: float) -> Tensor:
        update, saved = bounded_adam_step(raw, nominal, seen, log_range, scale)
        ctx.save_for_backward(nominal, seen, *saved)
        ctx.log_range, ctx.scale = log_range, scale
        return update

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_update: Tensor) -> tuple[Tensor | None, ...]:
        nominal, seen, tanh_magnitude, tanh_offset, magnitude, clipped = ctx.saved_tensors
        grad_step = torch.where(seen, grad_update * -ctx.scale, 0.0)
        grad_raw = grad_nominal = None
        if ctx.needs_input_grad[0]:
            grad_raw = torch.stack((
                grad_step * clipped * magnitude * ctx.log_range * (1 - tanh_magnitude * tanh_magnitude),
                grad_step * (tanh_offset * tanh_offset - 1),
            ), dim=1)
        if ctx.needs_input_grad[1]:  # clamp passes the gradient where -1 <= nominal <= 1, as torch.clamp does
            grad_nominal = grad_step * magnitude * ((nominal >= -1.0) & (nominal <= 1.0))
        return grad_raw, grad_nominal, None, None, None
