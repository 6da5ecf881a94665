"""Where the LSTM runs on the C kernel (:mod:`learnedopt._kernel`): the optimizer's whole step in place
(:class:`KernelStep`) and all layers of a differentiable step as one autograd node (:class:`FusedLSTM`). Both
are twins of the torch ops in :mod:`.cell`, :mod:`.features` and :mod:`.output`, tested against them
(``tests/test_kernel.py``, ``tests/test_lstm.py``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import _kernel
from ..rules import RuleState
from .cell import gate_weight

if TYPE_CHECKING:
    from .net import CoordinatewiseLSTM

__all__ = ["KernelStep", "FusedLSTM", "cell_library"]


def cell_library(weights: Sequence[Tensor], features: Tensor, h: Tensor, c: Tensor) -> Any | None:
    """The C library whose ``cell_forward``/``cell_backward`` run these layers, or ``None`` where they do not apply
    (not plain float32 CPU tensors, more input features than hidden units, no C compiler): then the torch ops run."""
    hidden = h.shape[-1]
    tensors = (*weights, features, h, c)
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None  # a tensor subclass (DTensor, ...) has no plain data pointer: the torch ops run
    if features.shape[1] > hidden:
        return None
    try:  # the cell's code depends on the hidden size only; the other constants pick the float32-state build
        return _kernel.load(_kernel.Build(hidden=hidden, layers=1, decays=1, paper=False, adam=False, outputs=1))
    except _kernel.KernelUnavailable:
        return None


def kernel_layout(weight: Tensor) -> Tensor:
    """A ``(4H, in + H + 1)`` gate weight in the kernel's layout: ``(in + H + 1, GP)``, the gates zero-padded."""
    gates = weight.shape[0]
    return torch.nn.functional.pad(weight.detach().t(), (0, _kernel.padded(gates) - gates)).contiguous()


def pointers(tensors: Sequence[Tensor | None]) -> list[int | None]:
    """Addresses for the kernel's argument structs (null for ``None``)."""
    return [t.data_ptr() if t is not None else None for t in tensors]


class FusedLSTM(torch.autograd.Function):
    """One step of every LSTM layer and the head as one autograd node on the C kernel (float32 CPU tensors): the
    differentiable path's hot loop in meta-training.

    The forward writes each layer's new state straight into the stacked ``(layers, N, H)`` outputs and the head's
    raw outputs, and keeps nothing else; the backward walks the layers in reverse, recomputing each block's gates
    in cache (faster than storing ``5 H`` floats per coordinate: ``benchmarks/meta_train_cost.py``) and turning
    them into the gate gradients, which it multiplies straight into the gradients of the layer's inputs, state and
    weights (and the head's). No per-layer stacking or concatenation copies, no autograd node per op. Equals the
    op-by-op reference within float rounding (``tests/test_lstm.py``). First-order only, as :class:`~learnedopt.lstm.cell.FusedCell`.
    """

    @staticmethod
    def forward(ctx: Any, library: Any, features: Tensor, h: Tensor, c: Tensor, head: Tensor, *weights: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``head`` is the ``(outputs, H + 1)`` head with its bias last; returns ``raw, new_h, new_c``."""
        layers, rows, hidden = h.shape
        features, h, c = features.contiguous(), h.contiguous(), c.contiguous()
        new_h, new_c = torch.empty_like(h), torch.empty_like(c)
        raw = h.new_empty(rows, head.shape[0])
        laid_out = [kernel_layout(weight) for weight in weights]  # detached copies, reused by the backward
        x = features
        for layer, weight in enumerate(laid_out):
            top = layer == layers - 1
            tensors = (x, h[layer], c[layer], weight, head if top else None, new_h[layer], new_c[layer],
                       raw if top else None)
            library.cell_forward(_kernel.CellForward(rows, x.shape[1], head.shape[0], *pointers(tensors)))
            x = new_h[layer]
        ctx.library, ctx.laid_out = library, laid_out
        ctx.save_for_backward(features, h, c, new_h, head, *weights)
        return raw, new_h, new_c

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_raw: Tensor, grad_h: Tensor, grad_c: Tensor) -> tuple[Tensor | None, ...]:
        features, h, c, new_h, head, *weights = ctx.saved_tensors
        layers, rows, hidden = h.shape
        needs = ctx.needs_input_grad  # (library, features, h, c, head, *weights)
        grad_raw, grad_h, grad_c = grad_raw.contiguous(), grad_h.contiguous(), grad_c.contiguous()
        grad_h_old = torch.empty_like(h) if needs[2] else None
        grad_c_old = torch.empty_like(c) if needs[3] else None
        grad_head = torch.zeros_like(head)
        grad_weights = []
        from_above = None  # the gradient that layer l + 1's input sends back to layer l's output
        for layer in reversed(range(layers)):
            weight = weights[layer]
            top = layer == layers - 1
            x = features if layer == 0 else new_h[layer - 1]
            width = x.shape[1]
            grad_x = x.new_empty(rows, width) if layer > 0 or needs[1] else None
            columns = width + hidden
            weight_rows = torch.nn.functional.pad(weight[:, :columns], (0, _kernel.padded(2 * hidden) - columns))
            grad_weight = h.new_zeros(width + hidden + 1, _kernel.padded(4 * hidden))
            tensors = (grad_h[layer], from_above, grad_c[layer], head if top else None, grad_raw if top else None,
                       grad_head if top else None, x, h[layer], c[layer], ctx.laid_out[layer],
                       weight_rows.contiguous(), grad_weight, grad_x,
                       None if grad_h_old is None else grad_h_old[layer],
                       None if grad_c_old is None else grad_c_old[layer])
            ctx.library.cell_backward(_kernel.CellBackward(rows, width, head.shape[0], *pointers(tensors)))
            grad_weights.append(grad_weight[:, : 4 * hidden].t() if needs[5 + layer] else None)
            from_above = grad_x
        return (None, from_above if needs[1] else None, grad_h_old, grad_c_old,
                grad_head if needs[4] else None, *reversed(grad_weights))



class KernelStep:
    """The rule's step without autograd as one C-kernel call per tensor, in place: features, every layer, the
    head and the output map in one pass over each block of the state. The same state entries as the torch ops,
    the same results within float rounding."""

    def __init__(self, net: CoordinatewiseLSTM) -> None:
        self.net = net

    def libraries(self, grads: Sequence[Tensor], state: RuleState, required: bool) -> dict[torch.dtype, Any] | None:
        """The library per hidden-state dtype in ``state``, or ``None`` where the kernel does not apply or cannot
        be built (then ``required`` raises, saying why)."""
        config = self.net.config
        moments = ("m", "v") if config.uses_moments else ()
        reason = None
        if any(type(g) is not torch.Tensor for g in grads):  # DTensor, FakeTensor, ...: no plain data pointer
            reason = "it takes plain tensors only (not a tensor subclass)"
        elif any(g.device.type != "cpu" for g in grads):
            reason = "it runs on CPU tensors only"
        elif self.net.head.weight.dtype != torch.float32:
            reason = f"it needs a float32 net, this one is {self.net.head.weight.dtype}"
        elif len(config.momentum_decays) > _kernel.abi.MAX_DECAYS:
            reason = f"it supports at most {_kernel.abi.MAX_DECAYS} momentum decays"
        elif any(
            s["h"].dtype not in (torch.float32, torch.bfloat16) or s["c"].dtype != s["h"].dtype
            or not (s["h"].is_contiguous() and s["c"].is_contiguous())
            or any(s[k].dtype != torch.float32 or not s[k].is_contiguous() for k in moments)
            for s in state
        ):
            reason = "it needs a contiguous float32 or bfloat16 hidden state and float32 moments"
        if reason is None:
            check_state_sizes(self.net, grads, state)
            try:
                return {dtype: _kernel.load(self._build(dtype)) for dtype in {s["h"].dtype for s in state}}
            except _kernel.KernelUnavailable as err:
                reason = str(err)
        if required:
            raise RuntimeError(f"backend='kernel' was asked for, but the C kernel cannot run this step: {reason}; "
                               "use backend='auto' to fall back to torch ops")
        return None

    def _build(self, state_dtype: torch.dtype) -> _kernel.Build:
        config = self.net.config
        return _kernel.Build(
            hidden=config.hidden_size, layers=config.num_layers, decays=len(config.momentum_decays),
            paper=config.inputs == "paper", adam=config.output == "adam", outputs=self.net.head.out_features,
            bf16_state=state_dtype == torch.bfloat16,
        )

    def __call__(
        self, libraries: dict[torch.dtype, Any], grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor]
    ) -> tuple[list[Tensor], RuleState]:
        """The updates; ``state``'s hidden state and moments are overwritten with the new ones."""
        config = self.net.config
        weights, head = self._weights()
        scalars: dict[float, Tensor] = {}  # per step count: parameters usually share it
        updates, new_state = [], []
        for g, s, p in zip(grads, state, params):
            grad = g.detach().reshape(-1).to(torch.float32).contiguous()
            update = torch.empty_like(grad)
            step = s["step"] + 1 if config.uses_moments else None
            key = float(step) if step is not None else 0.0
            if key not in scalars:
                scalars[key] = self._scalars(step)
            addresses = pointers([grad, s["h"], s["c"], *((s["m"], s["v"]) if step is not None else (None, None)),
                                  update, weights, head, scalars[key]])
            skipped = libraries[s["h"].dtype].lstm_step(_kernel.StepArgs(len(grad), *addresses), _threads(len(grad)))
            updates.append(update.reshape(p.shape).to(p.dtype))
            new = {"h": s["h"], "c": s["c"], "nonfinite": s["nonfinite"] + skipped}
            new_state.append({**new, **({"m": s["m"], "v": s["v"], "step": step} if step is not None else {})})
        return updates, new_state

    def _weights(self) -> tuple[Tensor, Tensor]:
        """Every layer's :func:`kernel_layout` gate weight in one buffer, and the head's ``(outputs, H + 1)`` with its
        bias last."""
        layers = [kernel_layout(gate_weight(cast(nn.LSTMCell, cell))).reshape(-1) for cell in self.net.cells]
        head = self.net.head
        return torch.cat(layers), torch.cat((head.weight, head.bias.unsqueeze(1)), 1).detach().contiguous()

    def _scalars(self, step: Tensor | None) -> Tensor:
        """The step's constants, rounded as the torch ops round them: the bias corrections come from the same
        float32 tensor expressions as :func:`~learnedopt.lstm.features.moment_features`."""
        config = self.net.config
        decays = torch.tensor(config.momentum_decays, dtype=torch.float32)
        return _kernel.step_scalars(
            beta2=config.rms_decay, bias2=1.0 if step is None else 1 - config.rms_decay**step,
            output_scale=config.output_scale, log_range=math.log(config.magnitude_range), p=config.preprocess_p,
            threshold=math.exp(-config.preprocess_p), exp_p=math.exp(config.preprocess_p), decays=decays,
            bias1=None if step is None else 1 - decays**step,
        )


def check_state_sizes(net: CoordinatewiseLSTM, grads: Sequence[Tensor], state: RuleState) -> None:
    """The kernel writes every state tensor in full: one that does not fit its gradient (a state loaded from
    another model or another sharding) is an error here, never memory written out of bounds."""
    for g, s in zip(grads, state):
        expected = net.state_shapes(g.numel())
        wrong = [k for k, shape in expected.items() if tuple(s[k].shape) != shape]
        if wrong:
            raise ValueError(f"the optimizer state {wrong} has shape {tuple(s[wrong[0]].shape)} but a parameter "
                             f"of {g.numel()} coordinates needs {expected[wrong[0]]}: was the state loaded from "
                             "another model or another sharding?")


def _threads(rows: int) -> int:
    """The in-place step's threads: torch's thread count where a call has enough rows to repay starting them."""
    return torch.get_num_threads() if rows >= 16384 else 1
