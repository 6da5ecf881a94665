"""The optimizer's step on GPUs as one Triton kernel: the twin of the C kernel's ``lstm_step`` (:class:`KernelStep`).

One program takes ``BLOCK`` coordinates of one tensor and does the whole in-place step in registers: the
features (running moments or the paper's log/sign map), every LSTM layer (the gate matmuls as ``tl.dot`` on
``[x, h]`` tiles padded to powers of two), the head and the output map, with non-finite gradients skipped. The
hidden state and the moments are read once and written once per step (float32 or bfloat16 state), which is the
step's memory floor. It runs wherever Triton runs: on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how ``tests/test_triton_step.py`` checks it against the torch ops without a GPU.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from .. import _kernel
from ..rules import RuleState
from .cell import gate_weight
from .features import largest_gradient
from .kernel_ops import check_state_sizes

if TYPE_CHECKING:
    from .net import CoordinatewiseLSTM

__all__ = ["TritonStep", "triton_available", "kernel_module", "padded_width", "split_gate_weight"]

_KERNELS: dict[bool, Any] = {}  # per interpreter mode: the module of jitted kernels


def triton_available(device: torch.device) -> str | None:
    """Why the Triton step cannot run on ``device`` (``None``: it can)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpreted and device.type == "cpu"):
        return "it runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _pow2(n: int, least: int = 16) -> int:
    """``n`` rounded up to a power of two, at least ``least`` (``tl.dot`` needs 16 or more)."""
    return max(least, 1 << max(n - 1, 0).bit_length())


def kernel_module() -> Any:
    """:mod:`._triton_kernels` in the mode ``TRITON_INTERPRET`` asks for now (Triton reads it when a function is
    decorated, so the module is imported, or reloaded, on first use in each mode)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted not in _KERNELS:
        module = importlib.import_module(f"{__package__}._triton_kernels")
        if module.INTERPRETED != interpreted:
            module = importlib.reload(module)
        _KERNELS[interpreted] = module
    return _KERNELS[interpreted]


def padded_width(hidden: int, inputs: int) -> int:
    """The kernels' tile width: features and hidden units padded to one power of two (16 or more, for tl.dot)."""
    return max(_pow2(hidden), _pow2(inputs))


def split_gate_weight(weight: Tensor, width: int, hp: int) -> tuple[Tensor, Tensor, Tensor]:
    """A ``(4H, width + H + 1)`` gate weight (:func:`~learnedopt.lstm.cell.gate_weight`) as the kernels' tiles:
    per gate the input weights ``(HP, HP)``, the recurrent ones ``(HP, HP)`` and the bias ``(HP,)``, zero-padded."""
    hidden = weight.shape[0] // 4
    rows = weight.detach().reshape(4, hidden, -1)
    wx = weight.new_zeros(4, hp, hp)
    wh = weight.new_zeros(4, hp, hp)
    bias = weight.new_zeros(4, hp)
    wx[:, :width, :hidden] = rows[:, :, :width].transpose(1, 2)
    wh[:, :hidden, :hidden] = rows[:, :, width : width + hidden].transpose(1, 2)
    bias[:, :hidden] = rows[:, :, -1]
    return wx.contiguous(), wh.contiguous(), bias.contiguous()


class TritonStep:
    """The rule's step without autograd as one Triton kernel launch per tensor, in place; the same state entries
    as the torch ops and the same results within float rounding (``tests/test_triton_step.py``)."""

    BLOCK = 64

    def __init__(self, net: CoordinatewiseLSTM) -> None:
        self.net = net

    def why_not(self, grads: Sequence[Tensor], state: RuleState) -> str | None:
        """Why this step cannot run on these tensors (``None``: it can)."""
        config = self.net.config
        if not grads:
            return "there is nothing to step"
        reason = triton_available(grads[0].device)
        if reason is not None:
            return reason
        if any(type(g) is not torch.Tensor or g.device != grads[0].device for g in grads):
            return "it takes plain tensors on one device"
        if self.net.head.weight.dtype != torch.float32:
            return f"it needs a float32 net, this one is {self.net.head.weight.dtype}"
        if len(config.momentum_decays) > _kernel.abi.MAX_DECAYS:
            return f"it supports at most {_kernel.abi.MAX_DECAYS} momentum decays"
        moments = ("m", "v") if config.uses_moments else ()
        if any(s["h"].dtype not in (torch.float32, torch.bfloat16) or s["c"].dtype != s["h"].dtype
               or not (s["h"].is_contiguous() and s["c"].is_contiguous())
               or any(s[k].dtype != torch.float32 or not s[k].is_contiguous() for k in moments) for s in state):
            return "it needs a contiguous float32 or bfloat16 hidden state and float32 moments"
        return None

    def __call__(self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor]
                 ) -> tuple[list[Tensor], RuleState]:
        """The updates; ``state``'s hidden state and moments are overwritten with the new ones."""
        check_state_sizes(self.net, grads, state)  # the same refusal as the C kernel's, before any write
        config = self.net.config
        device = grads[0].device
        hidden, layers = config.hidden_size, config.num_layers
        hp = padded_width(hidden, config.input_size)
        wx, wh, bias, head = self._weights(hp, device)
        kernel = kernel_module().step_kernel
        limit = largest_gradient(torch.float32)
        updates, new_state = [], []
        for g, s, p in zip(grads, state, params):
            grad = g.detach().reshape(-1).to(torch.float32).contiguous()
            n = grad.numel()
            update = torch.empty_like(grad)
            step = s["step"] + 1 if config.uses_moments else None
            scalars = self._scalars(step).to(device)
            skipped = torch.zeros(1, dtype=torch.int32, device=device)
            dummy = grad  # the moment pointers of a net without moments are never read
            if n:
                grid = (-(-n // self.BLOCK),)
                kernel[grid](grad, s["h"], s["c"], s["m"] if step is not None else dummy,
                             s["v"] if step is not None else dummy, update, wx, wh, bias, head, scalars, skipped, n,
                             limit, H=hidden, HP=hp, LAYERS=layers, NK=len(config.momentum_decays),
                             PAPER=config.inputs == "paper", ADAM=config.output == "adam", BLOCK=self.BLOCK)
            updates.append(update.reshape(p.shape).to(p.dtype))
            new = {"h": s["h"], "c": s["c"], "nonfinite": s["nonfinite"] + skipped[0].to(s["nonfinite"].dtype)}
            new_state.append({**new, **({"m": s["m"], "v": s["v"], "step": step} if step is not None else {})})
        return updates, new_state

    def _weights(self, hp: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every layer's :func:`split_gate_weight` tiles stacked, and the head as ``OUT`` rows of ``HP + 1``
        (bias last)."""
        hidden = self.net.config.hidden_size
        with torch.no_grad():
            tiles = [split_gate_weight(gate_weight(cell), cell.input_size, hp)  # type: ignore[arg-type]
                     for cell in self.net.cells]
            head = torch.zeros(self.net.head.out_features, hp + 1, device=device)
            head[:, :hidden] = self.net.head.weight
            head[:, hp] = self.net.head.bias
        wx, wh, bias = (torch.stack([t[k] for t in tiles]).to(device).contiguous() for k in range(3))
        return wx, wh, bias, head.contiguous()

    def _scalars(self, step: Tensor | None) -> Tensor:
        """The C kernel's ``scalars[]``, rounded as the torch ops round them."""
        config = self.net.config
        decays = torch.tensor(config.momentum_decays, dtype=torch.float32)
        step_cpu = None if step is None else step.detach().to("cpu", torch.float32)
        return _kernel.step_scalars(
            beta2=config.rms_decay, bias2=1.0 if step_cpu is None else 1 - config.rms_decay**step_cpu,
            output_scale=config.output_scale, log_range=math.log(config.magnitude_range), p=config.preprocess_p,
            threshold=math.exp(-config.preprocess_p), exp_p=math.exp(config.preprocess_p), decays=decays,
            bias1=None if step_cpu is None else 1 - decays**step_cpu,
        )
