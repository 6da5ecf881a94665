"""One LSTM cell in torch ops: the reference math (one matmul, one sigmoid over all gates), its hand-written
backward as one autograd node, and the compiled elementwise loop that backward runs."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["lstm_cell", "gate_weight", "FusedCell"]


def lstm_cell(weight: Tensor, x: Tensor, h: Tensor, c: Tensor, reference: bool = False) -> tuple[Tensor, Tensor]:
    """``nn.LSTMCell``'s math (``weight`` from :func:`gate_weight`) with one matmul for inputs, state and bias,
    and one contiguous sigmoid.

    On CPUs the stock cell applies sigmoid to strided gate slices, which does not vectorize; computing it over
    the whole contiguous gate matrix (the cell-gate columns are wasted work) is faster. The bias
    rides in the matmul as a column of ones: ``addmm`` would first copy the broadcast bias into every row.
    Under autograd the cell is differentiated by :class:`FusedCell`'s hand-written backward; ``reference=True``
    lets autograd record every op (the reference the hand-written backward is tested against).
    """
    if not reference and torch.is_grad_enabled():
        return FusedCell.apply(weight, x, h, c)
    new_h, new_c, _ = cell_math(weight, x, h, c)
    return new_h, new_c


def gate_weight(cell: nn.LSTMCell) -> Tensor:
    """``[W_ih, W_hh, b_ih + b_hh]`` ``(4H, in + H + 1)``, the cell gate's rows scaled by 2 (see
    :func:`cell_elementwise`): what multiplies ``[x, h, 1]``, for the torch cell and the fused kernel alike."""
    weight = torch.cat((cell.weight_ih, cell.weight_hh, (cell.bias_ih + cell.bias_hh).unsqueeze(1)), dim=1)
    scale = weight.new_ones(len(weight), 1)
    scale[2 * cell.hidden_size : 3 * cell.hidden_size] = 2.0
    return weight * scale


def cell_math(weight: Tensor, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """The cell's forward: ``new_h``, ``new_c`` and what a backward needs (``inputs, sig, candidate, tanh_c``)."""
    inputs = torch.cat((x, h, torch.ones_like(h[:, :1])), dim=1)
    gates = torch.mm(inputs, weight.t())
    new_h, new_c, sig, candidate, tanh_c = cell_elementwise(gates, c)
    return new_h, new_c, (inputs, sig, candidate, tanh_c)


def cell_elementwise(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Everything of the cell after the matmul (the one copy of the LSTM's elementwise math).

    Both tanh are computed as ``tanh(x) = 2 sigmoid(2x) - 1``: the cell gate's matmul rows come pre-scaled by 2
    (:func:`lstm_cell`), so its tanh rides on the one sigmoid over all gates: one pass over memory fewer, and on
    some CPUs ``torch.tanh`` is much slower than ``torch.sigmoid`` (``benchmarks/step.py`` measures both rates).
    """
    size = c.shape[1]
    sig = torch.sigmoid(gates)  # gate order of nn.LSTMCell: input, forget, cell, output
    candidate = 2 * sig[:, 2 * size : 3 * size] - 1
    new_c = torch.addcmul(sig[:, size : 2 * size] * c, sig[:, :size], candidate)
    tanh_c = 2 * torch.sigmoid(2 * new_c) - 1
    return sig[:, 3 * size :] * tanh_c, new_c, sig, candidate, tanh_c


def cell_elementwise_backward(
    grad_h: Tensor, grad_c: Tensor, c: Tensor, sig: Tensor, candidate: Tensor, tanh_c: Tensor
) -> tuple[Tensor, Tensor]:
    """The derivative of :func:`cell_elementwise`: the gates' gradient ``(N, 4H)`` and the old cell's."""
    size = c.shape[1]
    i, f, g, o = (sig[:, k * size : (k + 1) * size] for k in range(4))
    grad_c = grad_c + grad_h * o * (1 - tanh_c * tanh_c)  # through new_h = o * tanh(new_c)
    grad_gates = torch.cat(
        (
            grad_c * candidate * i * (1 - i),
            grad_c * c * f * (1 - f),
            grad_c * i * 2 * g * (1 - g),  # candidate = 2 sigmoid(gate) - 1
            grad_h * tanh_c * o * (1 - o),
        ),
        dim=1,
    )
    return grad_gates, grad_c * f


_COMPILED: dict[str, Callable[..., Any]] = {}


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` through ``torch.compile`` (one fused loop instead of a pass over memory per op), or ``fn`` itself
    where compilation is unavailable or fails. Only the row count is dynamic, so chunks of any size share one
    compilation and the hidden size stays a constant (no guards on coincidences such as ``N == 4 * H``)."""
    if fn.__name__ not in _COMPILED:
        compiled = torch.compile(fn, dynamic=False)

        def guarded(*args: Tensor) -> Any:
            for arg in args:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
            try:
                return compiled(*args)
            except Exception as err:  # no C++ compiler, an unsupported platform: eager math, said once
                warnings.warn(f"learnedopt: torch.compile of the LSTM cell failed ({type(err).__name__}); "
                              "running it eagerly")
                _COMPILED[fn.__name__] = fn
                return fn(*args)

        _COMPILED[fn.__name__] = guarded
    return _COMPILED[fn.__name__]



class FusedCell(torch.autograd.Function):
    """The LSTM cell as one autograd node for the differentiable path where the C kernel does not run (float64,
    GPUs, ``backend="torch"``): the forward is the eager torch math, the backward one compiled elementwise loop that
    writes all four gates' gradients into one ``(N, 4H)`` buffer, then two matmuls, where autograd's record of the
    eager ops would walk a dozen nodes, each a pass over memory, and allocate a zero-filled ``(N, 4H)`` gradient
    per gate slice.

    First-order only (the meta-gradient of truncated backprop, MAML's backward through the inner rule): a second
    backward through it raises, as ``once_differentiable`` says.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        new_h, new_c, saved = cell_math(weight, x, h, c)
        ctx.save_for_backward(weight, c, *saved)
        ctx.input_width = x.shape[1]
        return new_h, new_c

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_h: Tensor, grad_c: Tensor) -> tuple[Tensor | None, ...]:
        weight, c, inputs, sig, candidate, tanh_c = ctx.saved_tensors
        size, width = c.shape[1], ctx.input_width
        tensors: tuple[Tensor, ...] = (grad_h, grad_c, c, sig, candidate, tanh_c)
        if sig.dtype == torch.float32:  # one compiled kernel: float32, dense, no autograd flags (fewer guards)
            derivative = _compiled(cell_elementwise_backward)
            tensors = tuple(t.detach().contiguous() for t in tensors)
        else:
            derivative = cell_elementwise_backward
        grad_gates, grad_c_old = derivative(*tensors)
        # both products as (small x N) results, transposed back as views: faster than the direct forms for these
        # tall-skinny shapes on a CPU (measured by benchmarks/meta_train_cost.py --parts floor)
        grad_weight = torch.mm(inputs.t(), grad_gates).t() if ctx.needs_input_grad[0] else None
        grad_x = grad_h_old = None
        if ctx.needs_input_grad[1]:
            grad_inputs = torch.mm(weight.t(), grad_gates.t()).t()
            grad_x, grad_h_old = grad_inputs[:, :width], grad_inputs[:, width : width + size]
        elif ctx.needs_input_grad[2]:  # detached features (truncated backprop): only the state's columns
            grad_h_old = torch.mm(weight[:, width : width + size].t(), grad_gates.t()).t()
        return grad_weight, grad_x, grad_h_old, grad_c_old if ctx.needs_input_grad[3] else None

