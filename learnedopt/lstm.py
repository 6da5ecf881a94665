"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016), as a net and as an update rule.

One small LSTM is applied to every coordinate of every parameter as a batch: the weights are shared, the hidden
state is per coordinate. This file holds the reference copy of that math; :class:`learnedopt.LearnedOptimizer`
and the unroll engine both call :class:`LSTMRule`, which on CPUs runs its C twin (``_lstm_kernel.c``, tested
against this file's torch ops: ``tests/test_kernel.py``, ``tests/test_lstm.py``).

Two input sets and two output maps are selectable in :class:`LSTMConfig` and saved with every net:

* ``inputs="paper"``: the paper's ``(log|g|/p, sign g)`` (Appendix A). ``inputs="normalized"``: the gradient
  and its momenta at several decays, each divided by the running RMS of the gradient (RNNprop, Lv et al. 2017;
  multi-timescale momentum, Wichrowska et al. 2017): scale-free, and able to express Adam-like rules.
* ``output="linear"``: the paper's ``output_scale * head(h)``, unbounded. ``output="adam"``: the LSTM modulates a
  nominal Adam step (Harrison et al. 2022): ``-output_scale * (r^tanh(a) * clip(m_hat / sqrt(v_hat), 1) -
  tanh(b))`` for the head's two outputs ``(a, b)`` and ``r = magnitude_range``. Its size is bounded by
  construction, ``|update| <= lr * output_scale * (magnitude_range + 1)``; a coordinate that has never had a
  nonzero gradient gets an exactly-zero update; and a zero-initialized head is exactly Adam at
  ``lr = output_scale`` (with the nominal step clipped to 1), a safe starting point for meta-training.

Reference: M. Andrychowicz et al., "Learning to learn by gradient descent by gradient descent", NeurIPS 2016
(Section 2.1 for the architecture, Appendix A for the gradient preprocessing).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Iterator, Sequence, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import kernel as _kernel
from .rules import ParamState, RuleState

__all__ = ["LSTMConfig", "CoordinatewiseLSTM", "LSTMRule", "preprocess_gradient", "largest_gradient", "INPUTS", "OUTPUTS"]

INPUTS = ("paper", "normalized")
OUTPUTS = ("linear", "adam")
_EPS = 1e-8  # added to sqrt(v_hat), as Adam's eps


def largest_gradient(dtype: torch.dtype) -> float:
    """The largest gradient magnitude the rule takes in ``dtype``: a power of two whose square, and any running
    average of such squares, stays finite (``2^63`` for float32, ``2^511`` for float64). Larger ones are skipped
    as non-finite, the same way in the torch ops and the C kernel (``_lstm_kernel.c``'s ``GRAD_LIMIT``)."""
    return 2.0 ** (math.frexp(torch.finfo(dtype).max)[1] // 2 - 1)


def preprocess_gradient(grad: Tensor, p: float = 10.0) -> Tensor:
    """Map gradients of any magnitude to two features of order one (Appendix A of the paper).

    ``(log|g| / p, sign g)`` where ``|g| >= e^-p``, else ``(-1, e^p g)``. Returns shape ``grad.shape + (2,)``.
    The log is taken of ``|g|`` clamped at ``e^-p`` so that its derivative stays finite in the branch
    that ``torch.where`` discards (second-order meta-gradients pass through here).

    Example:
        >>> preprocess_gradient(torch.tensor([1.0, 0.0]))
        tensor([[ 0.,  1.],
                [-1.,  0.]])
    """
    threshold = math.exp(-p)
    large = grad.abs() >= threshold
    log_feature = torch.log(grad.abs().clamp_min(threshold)) / p
    first = torch.where(large, log_feature, torch.full_like(grad, -1.0))
    second = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack((first, second), dim=-1)


@dataclass(frozen=True)
class LSTMConfig:
    """Architecture of a :class:`CoordinatewiseLSTM`; saved beside the weights so a file rebuilds its net.

    The defaults are the paper's net (and what net files written before ``inputs``/``output`` existed mean).
    ``momentum_decays`` and ``rms_decay`` define the running moments that ``inputs="normalized"`` and
    ``output="adam"`` use; the first momentum decay is the nominal Adam step's ``beta1``.
    """

    hidden_size: int = 20
    num_layers: int = 2
    preprocess_p: float = 10.0
    output_scale: float = 0.1
    inputs: str = "paper"
    output: str = "linear"
    momentum_decays: tuple[float, ...] = (0.9, 0.5, 0.99)
    rms_decay: float = 0.999
    magnitude_range: float = 100.0

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError(f"hidden_size and num_layers must be >= 1, got {self}")
        if self.inputs not in INPUTS or self.output not in OUTPUTS:
            raise ValueError(f"inputs must be one of {INPUTS} and output one of {OUTPUTS}, got {self}")
        decays = (*self.momentum_decays, self.rms_decay)
        if not self.momentum_decays or not all(0.0 <= d < 1.0 for d in decays):
            raise ValueError(f"momentum_decays (at least one) and rms_decay must lie in [0, 1), got {self}")
        if not self.magnitude_range >= 1.0:
            raise ValueError(f"magnitude_range must be >= 1, got {self.magnitude_range}")

    @property
    def input_size(self) -> int:
        return 2 if self.inputs == "paper" else 1 + len(self.momentum_decays)

    @property
    def uses_moments(self) -> bool:
        """Whether the rule keeps running moments of the gradient in its state."""
        return self.inputs == "normalized" or self.output == "adam"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LSTMConfig":
        """Rebuild from :func:`dataclasses.asdict` output (sequences back to tuples)."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fields)


class CoordinatewiseLSTM(nn.Module):
    """A 2-layer LSTM (20 units by default) that maps each coordinate's input features to raw outputs.

    Input: features ``(N, config.input_size)`` and hidden state ``h, c`` of shape ``(num_layers, N, hidden_size)``.
    Output: the head's raw outputs ``(N, 1)`` (``output="linear"``) or ``(N, 2)`` (``output="adam"``) and the new
    ``h, c``. :class:`LSTMRule` computes the features from gradients and turns raw outputs into updates.

    Example:
        >>> net = CoordinatewiseLSTM()
        >>> h, c = net.initial_state(5)
        >>> raw, (h, c) = net(preprocess_gradient(torch.randn(5)), (h, c))
        >>> raw.shape, h.shape
        (torch.Size([5, 1]), torch.Size([2, 5, 20]))
    """

    def __init__(self, config: LSTMConfig | None = None, **overrides: object) -> None:
        super().__init__()
        config = LSTMConfig(**{**asdict(config or LSTMConfig()), **overrides})  # type: ignore[arg-type]
        self.config = config
        sizes = [config.input_size] + [config.hidden_size] * config.num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(i, config.hidden_size) for i in sizes[:-1])
        self.head = nn.Linear(config.hidden_size, 1 if config.output == "linear" else 2)
        if config.output == "adam":  # untrained, the rule is exactly its nominal Adam step
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def initial_state(
        self, n: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """Zero hidden and cell state for ``n`` coordinates."""
        ref = self.head.weight
        shape = (self.config.num_layers, n, self.config.hidden_size)
        zeros = torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)
        return zeros, zeros.clone()

    def forward(self, features: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        raw, h, c = self.step(features, state[0], state[1])
        return raw, (h, c)

    def step(
        self, features: Tensor, h: Tensor, c: Tensor, fused: bool = True, kernel: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` as ``(raw, new_h, new_c)``. Under autograd, ``fused=False`` differentiates the cells op by
        op (the reference path) instead of with their fused backward, and ``kernel=False`` keeps the fused cells on
        torch ops where all layers would run as one C-kernel node (:class:`_FusedLSTM`)."""
        weights = [_gate_weight(cast(nn.LSTMCell, cell)) for cell in self.cells]
        if fused and kernel and torch.is_grad_enabled():
            library = _cell_kernel(weights, features, h, c)
            if library is not None:
                head = torch.cat((self.head.weight, self.head.bias.unsqueeze(1)), dim=1)
                return _FusedLSTM.apply(library, features, h, c, head, *weights)
        x = features
        hs, cs = [], []
        # unbind, not h[layer]: its backward stacks the layers' gradients once, where indexing would zero-fill and
        # accumulate a full (layers, N, hidden) gradient per layer
        for weight, h_layer, c_layer in zip(weights, h.unbind(0), c.unbind(0)):
            x, cl = _lstm_cell(weight, x, h_layer, c_layer, fused)
            hs.append(x)
            cs.append(cl)
        return self.head(x), torch.stack(hs), torch.stack(cs)

    def to_update(self, raw: Tensor, nominal: Tensor | None, seen: Tensor | None, fused: bool = True) -> Tensor:
        """The additive update ``(N,)`` from the head's raw outputs (see the module docstring for the maps).

        ``nominal`` is the Adam direction ``m_hat / (sqrt(v_hat) + eps)`` and ``seen`` marks coordinates that have
        had a nonzero gradient; both are needed for ``output="adam"`` only. Under autograd the bounded map is one
        node with a hand-written backward (``fused=False``: autograd's op-by-op record, the reference). A
        non-finite raw output (only a net with non-finite weights makes one) counts as zero, so the update stays
        finite and, for ``output="adam"``, inside its bound whatever the weights.
        """
        cfg = self.config
        raw = torch.where(torch.isfinite(raw), raw, 0.0)  # a net with non-finite weights still moves safely
        if cfg.output == "linear":
            return raw[:, 0] * cfg.output_scale
        assert nominal is not None and seen is not None
        constants = (math.log(cfg.magnitude_range), cfg.output_scale)
        if fused and torch.is_grad_enabled():
            return _BoundedAdamStep.apply(raw, nominal, seen, *constants)
        return _bounded_adam_step(raw, nominal, seen, *constants)[0]


def _bounded_adam_step(
    raw: Tensor, nominal: Tensor, seen: Tensor, log_range: float, scale: float
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``output="adam"``'s map (the one copy of its math) and what its backward needs."""
    tanh_magnitude, tanh_offset = torch.tanh(raw[:, 0]), torch.tanh(raw[:, 1])
    magnitude = torch.exp(log_range * tanh_magnitude)
    clipped = nominal.clamp(-1.0, 1.0)
    step = magnitude * clipped - tanh_offset
    return torch.where(seen, step * -scale, 0.0), (tanh_magnitude, tanh_offset, magnitude, clipped)


class _BoundedAdamStep(torch.autograd.Function):
    """:func:`_bounded_adam_step` as one autograd node: its backward is a few elementwise ops writing the raw
    outputs' gradient as one ``(N, 2)`` tensor, where autograd's record walks a node per op and zero-fills an
    ``(N, 2)`` gradient for each column it selects (meta-training's default-net truncations: ~10% of the time).
    First-order only, as :class:`_FusedCell`."""

    @staticmethod
    def forward(ctx: Any, raw: Tensor, nominal: Tensor, seen: Tensor, log_range: float, scale: float) -> Tensor:
        update, saved = _bounded_adam_step(raw, nominal, seen, log_range, scale)
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


def _lstm_cell(weight: Tensor, x: Tensor, h: Tensor, c: Tensor, fused: bool = True) -> tuple[Tensor, Tensor]:
    """``nn.LSTMCell``'s math (``weight`` from :func:`_gate_weight`) with one matmul for inputs, state and bias,
    and one contiguous sigmoid.

    On CPUs the stock cell applies sigmoid to strided gate slices, which does not vectorize; computing it over
    the whole contiguous gate matrix (the cell-gate columns are wasted work) is ~1.6x faster per step. The bias
    rides in the matmul as a column of ones: ``addmm`` would first copy the broadcast bias into every row.
    Under autograd, ``fused=True`` differentiates the cell with :class:`_FusedCell`'s hand-written backward;
    ``fused=False`` lets autograd record every op (the reference the fused backward is tested against).
    """
    if fused and torch.is_grad_enabled():
        return _FusedCell.apply(weight, x, h, c)
    new_h, new_c, _ = _cell_math(weight, x, h, c)
    return new_h, new_c


def _gate_weight(cell: nn.LSTMCell) -> Tensor:
    """``[W_ih, W_hh, b_ih + b_hh]`` ``(4H, in + H + 1)``, the cell gate's rows scaled by 2 (see
    :func:`_cell_elementwise`): what multiplies ``[x, h, 1]``, for the torch cell and the fused kernel alike."""
    weight = torch.cat((cell.weight_ih, cell.weight_hh, (cell.bias_ih + cell.bias_hh).unsqueeze(1)), dim=1)
    scale = weight.new_ones(len(weight), 1)
    scale[2 * cell.hidden_size : 3 * cell.hidden_size] = 2.0
    return weight * scale


def _cell_math(weight: Tensor, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """The cell's forward: ``new_h``, ``new_c`` and what a backward needs (``inputs, sig, candidate, tanh_c``)."""
    inputs = torch.cat((x, h, torch.ones_like(h[:, :1])), dim=1)
    gates = torch.mm(inputs, weight.t())
    new_h, new_c, sig, candidate, tanh_c = _cell_elementwise(gates, c)
    return new_h, new_c, (inputs, sig, candidate, tanh_c)


def _cell_elementwise(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Everything of the cell after the matmul (the one copy of the LSTM's elementwise math).

    Both tanh are computed as ``tanh(x) = 2 sigmoid(2x) - 1``: the cell gate's matmul rows come pre-scaled by 2
    (:func:`_lstm_cell`), so its tanh rides on the one sigmoid over all gates. On CPUs ``torch.tanh`` runs ~10x
    slower than ``torch.sigmoid`` (both rates: ``benchmarks/step.py``).
    """
    size = c.shape[1]
    sig = torch.sigmoid(gates)  # gate order of nn.LSTMCell: input, forget, cell, output
    candidate = 2 * sig[:, 2 * size : 3 * size] - 1
    new_c = torch.addcmul(sig[:, size : 2 * size] * c, sig[:, :size], candidate)
    tanh_c = 2 * torch.sigmoid(2 * new_c) - 1
    return sig[:, 3 * size :] * tanh_c, new_c, sig, candidate, tanh_c


def _cell_elementwise_backward(
    grad_h: Tensor, grad_c: Tensor, c: Tensor, sig: Tensor, candidate: Tensor, tanh_c: Tensor
) -> tuple[Tensor, Tensor]:
    """The derivative of :func:`_cell_elementwise`: the gates' gradient ``(N, 4H)`` and the old cell's."""
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


def _cell_kernel(weights: Sequence[Tensor], features: Tensor, h: Tensor, c: Tensor) -> Any | None:
    """The C library whose ``cell_forward``/``cell_backward`` run these layers, or ``None`` where they do not apply
    (not plain float32 CPU tensors, more input features than hidden units, no C compiler): then the torch ops run."""
    hidden = h.shape[-1]
    tensors = (*weights, features, h, c)
    if any(type(t) is not torch.Tensor or t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None  # a tensor subclass (DTensor, ...) has no plain data pointer: the torch ops run
    if features.shape[1] > hidden:
        return None
    try:  # the cell's code depends on the hidden size only; the other constants pick the float32-state build
        return _kernel.load(H=hidden, LAYERS=1, NK=1, PAPER=0, ADAM=0, OUT=1, BF16=0, GP=_padded(4 * hidden))
    except _kernel.KernelUnavailable:
        return None


def _transposed(weight: Tensor) -> Tensor:
    """A ``(4H, in + H + 1)`` gate weight in the kernel's layout: ``(in + H + 1, GP)``, the gates zero-padded."""
    gates = weight.shape[0]
    return torch.nn.functional.pad(weight.detach().t(), (0, _padded(gates) - gates)).contiguous()


def _padded(width: int) -> int:
    """``width`` rounded up to whole 16-float vectors (the C kernel's rows)."""
    return -(-width // 16) * 16


def _kernel_threads(rows: int) -> int:
    """The in-place step's threads: torch's thread count where a call has enough rows to repay starting them."""
    return torch.get_num_threads() if rows >= 16384 else 1


class _FusedLSTM(torch.autograd.Function):
    """One step of every LSTM layer and the head as one autograd node on the C kernel (float32 CPU tensors): the
    differentiable path's hot loop in meta-training.

    The forward writes each layer's new state straight into the stacked ``(layers, N, H)`` outputs and the head's
    raw outputs, and keeps nothing else; the backward walks the layers in reverse, recomputing each block's gates
    in cache (faster than storing ``5 H`` floats per coordinate: ``benchmarks/meta_train_cost.py``) and turning
    them into the gate gradients, which it multiplies straight into the gradients of the layer's inputs, state and
    weights (and the head's). No per-layer stacking or concatenation copies, no autograd node per op. Equals the
    op-by-op reference within float rounding (``tests/test_lstm.py``). First-order only, as :class:`_FusedCell`.
    """

    @staticmethod
    def forward(ctx: Any, library: Any, features: Tensor, h: Tensor, c: Tensor, head: Tensor, *weights: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``head`` is the ``(outputs, H + 1)`` head with its bias last; returns ``raw, new_h, new_c``."""
        layers, rows, hidden = h.shape
        features, h, c = features.contiguous(), h.contiguous(), c.contiguous()
        new_h, new_c = torch.empty_like(h), torch.empty_like(c)
        raw = h.new_empty(rows, head.shape[0])
        transposed = [_transposed(weight) for weight in weights]  # detached copies, reused by the backward
        x = features
        for layer, weight in enumerate(transposed):
            top = layer == layers - 1
            tensors = (x, h[layer], c[layer], weight, head if top else None, new_h[layer], new_c[layer],
                       raw if top else None)
            library.cell_forward(_kernel.CellForward(rows, x.shape[1], head.shape[0], *_pointers(tensors)))
            x = new_h[layer]
        ctx.library, ctx.transposed = library, transposed
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
            weight_rows = torch.nn.functional.pad(weight[:, :columns], (0, _padded(2 * hidden) - columns))
            grad_weight = h.new_zeros(width + hidden + 1, _padded(4 * hidden))
            tensors = (grad_h[layer], from_above, grad_c[layer], head if top else None, grad_raw if top else None,
                       grad_head if top else None, x, h[layer], c[layer], ctx.transposed[layer],
                       weight_rows.contiguous(), grad_weight, grad_x,
                       None if grad_h_old is None else grad_h_old[layer],
                       None if grad_c_old is None else grad_c_old[layer])
            ctx.library.cell_backward(_kernel.CellBackward(rows, width, head.shape[0], *_pointers(tensors)))
            grad_weights.append(grad_weight[:, : 4 * hidden].t() if needs[5 + layer] else None)
            from_above = grad_x
        return (None, from_above if needs[1] else None, grad_h_old, grad_c_old,
                grad_head if needs[4] else None, *reversed(grad_weights))


def _pointers(tensors: Sequence[Tensor | None]) -> list[int | None]:
    """Addresses for the kernel's argument structs (null for ``None``)."""
    return [t.data_ptr() if t is not None else None for t in tensors]


class _FusedCell(torch.autograd.Function):
    """The LSTM cell as one autograd node for the differentiable path where the C kernel does not run (float64,
    GPUs, ``kernel=False``): the forward is the eager torch math, the backward one compiled elementwise loop that
    writes all four gates' gradients into one ``(N, 4H)`` buffer, then two matmuls, where autograd's record of the
    eager ops would walk a dozen nodes, each a pass over memory, and allocate a zero-filled ``(N, 4H)`` gradient
    per gate slice.

    First-order only (the meta-gradient of truncated backprop, MAML's backward through the inner rule): a second
    backward through it raises, as ``once_differentiable`` says.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        new_h, new_c, saved = _cell_math(weight, x, h, c)
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
            derivative = _compiled(_cell_elementwise_backward)
            tensors = tuple(t.detach().contiguous() for t in tensors)
        else:
            derivative = _cell_elementwise_backward
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


def _moment_features(
    config: LSTMConfig, decays: Tensor, grad: Tensor, state: ParamState, keep: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, ParamState]:
    """Advance the running moments by one gradient; return the normalized features ``(N, 1 + K)``, the nominal
    Adam direction ``(N,)``, the ``seen`` mask and the new moment state.

    Moments use Adam's bias correction, so the first step's features are already of order one. Coordinates
    outside ``keep`` (non-finite gradients) keep their old moments. ``decays`` is ``config.momentum_decays`` as a
    ``(K, 1)`` tensor on the gradient's device (built once per step, not once per tensor).
    """
    beta2 = config.rms_decay
    m_old, v_old = state["m"].to(grad.dtype), state["v"].to(grad.dtype)
    step = state["step"] + 1
    m = torch.lerp(grad.unsqueeze(0), m_old, decays)  # decay * m_old + (1 - decay) * g
    v = torch.lerp(grad * grad, v_old, beta2)
    if keep is not None:
        m, v = torch.where(keep, m, m_old), torch.where(keep, v, v_old)
    scale = 1.0 / (torch.sqrt(v / (1 - beta2**step)) + _EPS)
    normed = m / (1 - decays**step) * scale
    features = torch.stack((grad * scale, *normed.unbind(0)), dim=1)  # (N, 1 + K), contiguous for the kernel
    return features, normed[0], v > 0, {"m": m, "v": v, "step": step}


class LSTMRule:
    """The LSTM optimizer as an update rule (see :mod:`learnedopt.rules`).

    All coordinates of all tensors passed to :meth:`update` form one flat batch, processed in chunks of
    ``chunk_size`` rows (the multi-tensor idea of ``torch.optim``'s ``foreach`` paths): a large tensor is split
    across chunks, small tensors (biases, norms) share one, so a model with hundreds of small tensors costs a
    few LSTM calls rather than hundreds, and a chunk's working set stays in cache. Parameters never leave their
    device.

    Computation runs in the net's dtype; the hidden state is stored in ``state_dtype`` (default: the net's dtype)
    and the update is returned in each parameter's dtype. Nets with running moments (``config.uses_moments``)
    keep them, and a step count, in the net's dtype: ``"m"`` ``(K, N)``, ``"v"`` ``(N,)``, ``"step"``.
    ``compile=True`` runs the net through :func:`torch.compile` when autograd is off (the
    :class:`~learnedopt.LearnedOptimizer` path; the differentiable unroll keeps eager mode, which supports
    second-order gradients); it fuses the gate nonlinearities and the cell update and changes results only within
    float rounding (its CPU speed-up over eager mode: results/performance.md). Under autograd the
    cells are differentiated by a fused, hand-written backward; ``fused=False`` keeps autograd's op-by-op record
    (the reference, and the baseline in ``benchmarks/meta_train_cost.py``).

    ``kernel`` picks whether the C kernel of :mod:`learnedopt.kernel` runs on a CPU. ``None`` (default): wherever
    it applies and can be built — a step without autograd (the optimizer's in-place step, evaluation unrolls under
    ``torch.no_grad``) on CPU tensors with a float32 net and a float32 or bfloat16 state runs as one kernel call
    per tensor, and under autograd all LSTM layers of a step on float32 CPU tensors run as one kernel node
    (:class:`_FusedLSTM`); torch ops elsewhere. ``True``: the no-autograd step requires the kernel (an error says
    why it cannot run). ``False``: torch ops only; they are the reference, which the kernel equals within float
    rounding (``tests/test_kernel.py``, ``tests/test_lstm.py``). A step traced by :func:`torch.compile` always
    runs the torch ops.

    Non-finite gradients: a coordinate whose gradient is NaN, +-Inf or larger in magnitude than
    :func:`largest_gradient` (2^63 for a float32 net: its square would overflow the second moment) gets a zero
    update and keeps its previous hidden state and moments, so a bad gradient never poisons a parameter or the
    state, and the coordinate trains on with the next finite gradient; ``state["nonfinite"]`` counts how many
    coordinate-steps were skipped this way.

    Example:
        >>> rule = LSTMRule(CoordinatewiseLSTM())
        >>> params = [torch.zeros(3, 4), torch.zeros(4)]
        >>> state = rule.init(params)
        >>> updates, state = rule.update([torch.ones(3, 4), torch.ones(4)], state, params)
        >>> updates[0].shape, state[0]["h"].shape, state[1]["h"].shape
        (torch.Size([3, 4]), torch.Size([2, 12, 20]), torch.Size([2, 4, 20]))
    """

    def __init__(
        self,
        net: CoordinatewiseLSTM,
        state_dtype: torch.dtype | None = None,
        chunk_size: int = 16384,
        compile: bool = False,
        fused: bool = True,
        kernel: bool | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.kernel = kernel
        self.net = net
        self.state_dtype = state_dtype
        self.chunk_size = chunk_size
        self.compile = compile
        self.fused = fused
        self._compiled: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.net.head.weight.dtype

    def __getstate__(self) -> dict:
        """Copies and pickles drop the compiled step (it is rebuilt on first use)."""
        return {**self.__dict__, "_compiled": None}

    def init(self, params: Sequence[Tensor]) -> RuleState:
        dtype = self.state_dtype or self.compute_dtype
        config = self.net.config
        state = []
        for p in params:
            h, c = self.net.initial_state(p.numel(), dtype=dtype, device=p.device)
            s = {"h": h, "c": c, "nonfinite": torch.zeros((), dtype=torch.int64, device=p.device)}
            if config.uses_moments:
                n, k, compute = p.numel(), len(config.momentum_decays), self.compute_dtype
                s["m"] = torch.zeros(k, n, dtype=compute, device=p.device)
                s["v"] = torch.zeros(n, dtype=compute, device=p.device)
                s["step"] = torch.zeros((), dtype=compute, device=p.device)
            state.append(s)
        return state

    def update(
        self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor], *, inplace: bool = False
    ) -> tuple[list[Tensor], RuleState]:
        """The updates and the new state; ``inplace=True`` writes the new hidden state into ``state``'s tensors.

        In-place is what :class:`~learnedopt.LearnedOptimizer` uses under ``torch.no_grad``: the caller gives up
        the old state, and the step allocates no new 320 bytes per coordinate (fresh multi-megabyte buffers cost
        page faults on every step). The default keeps the rule pure, as the unroll engine needs.
        """
        if inplace and torch.is_grad_enabled() and any(s["h"].requires_grad for s in state):
            raise RuntimeError("inplace=True cannot overwrite a hidden state that autograd tracks; use inplace=False")
        # under torch.compile the torch ops are what gets traced: an opaque C call would break the graph
        if not torch.is_grad_enabled() and self.kernel is not False and not torch.compiler.is_compiling():
            libraries = self._kernel_libraries(grads, state)
            if libraries is not None:
                if not inplace:  # pure: the kernel updates copies (one pass over the state, still far cheaper)
                    state = [{k: v.clone() if k in ("h", "c", "m", "v") else v for k, v in s.items()} for s in state]
                return self._kernel_update(libraries, grads, state, params)
        config = self.net.config
        flat = [g.reshape(-1).to(self.compute_dtype) for g in grads]
        limit = largest_gradient(self.compute_dtype)
        masks = [g.abs() <= limit for g in flat]  # false for NaN, +-Inf and gradients whose square overflows
        # one host sync for the whole group, not one per tensor (each would stall a GPU's queue); under
        # torch.compile, and for parameters on the meta device, no sync at all: every tensor takes the masked
        # path, which gives the same result
        if torch.compiler.is_compiling() or any(g.is_meta for g in flat):
            clean = [False] * len(masks)
        else:
            clean = torch.stack([m.all() for m in masks]).tolist() if masks else []
        finite = [None if ok else m for ok, m in zip(clean, masks)]
        flat = [g if ok else torch.where(m, g, 0.0) for g, ok, m in zip(flat, clean, masks)]
        features, nominals, seens, moments = [], [], [], []
        decays = {  # the momenta's decays as a (K, 1) tensor, once per device rather than once per tensor
            device: torch.tensor(config.momentum_decays, dtype=self.compute_dtype, device=device).unsqueeze(1)
            for device in ({g.device for g in flat} if config.uses_moments else ())
        }
        for g, s, keep in zip(flat, state, finite):
            if config.uses_moments:
                x, nominal, seen, moment_state = _moment_features(config, decays[g.device], g, s, keep)
                nominals.append(nominal)
                seens.append(seen)
                moments.append(moment_state)
            if config.inputs == "paper":
                x = preprocess_gradient(g, config.preprocess_p)
            features.append(x)
        hs, cs = [s["h"] for s in state], [s["c"] for s in state]
        if torch.is_grad_enabled() and not inplace:
            raws, new_hs, new_cs = self._run_differentiable(features, hs, cs, finite)
        else:
            raws, new_hs, new_cs = self._run_in_place(features, hs, cs, finite, inplace)
        updates, new_state = [], []
        for i, (s, p, keep) in enumerate(zip(state, params, finite)):
            adam_inputs: tuple[Tensor | None, Tensor | None] = (
                (nominals[i], seens[i]) if config.uses_moments else (None, None)
            )
            u = self.net.to_update(raws[i], *adam_inputs, fused=self.fused)
            if keep is not None:
                u = torch.where(keep, u, 0.0)
            updates.append(u.reshape(p.shape).to(p.dtype))
            skipped = (~keep).sum() if keep is not None else 0
            new = {"h": new_hs[i], "c": new_cs[i], "nonfinite": s["nonfinite"] + skipped}
            new_state.append({**new, **(moments[i] if config.uses_moments else {})})
        return updates, new_state

    def _kernel_libraries(self, grads: Sequence[Tensor], state: RuleState) -> dict[torch.dtype, Any] | None:
        """The fused kernel's library per hidden-state dtype in ``state``, or ``None`` where the kernel does not
        apply or cannot be built (then ``kernel=True`` raises, saying why)."""
        config = self.net.config
        moments = ("m", "v") if config.uses_moments else ()
        reason = None
        if any(type(g) is not torch.Tensor for g in grads):  # DTensor, FakeTensor, ...: no plain data pointer
            reason = "it takes plain tensors only (not a tensor subclass)"
        elif any(g.device.type != "cpu" for g in grads):
            reason = "it runs on CPU tensors only"
        elif self.compute_dtype != torch.float32:
            reason = f"it needs a float32 net, this one is {self.compute_dtype}"
        elif len(config.momentum_decays) > 8:
            reason = "it supports at most 8 momentum decays"
        elif any(
            s["h"].dtype not in (torch.float32, torch.bfloat16) or s["c"].dtype != s["h"].dtype
            or not (s["h"].is_contiguous() and s["c"].is_contiguous())
            or any(s[k].dtype != torch.float32 or not s[k].is_contiguous() for k in moments)
            for s in state
        ):
            reason = "it needs a contiguous float32 or bfloat16 hidden state and float32 moments"
        if reason is None:
            self._check_state_sizes(grads, state)
            try:
                return {dtype: self._kernel_library(dtype) for dtype in {s["h"].dtype for s in state}}
            except _kernel.KernelUnavailable as err:
                reason = str(err)
        if self.kernel:
            raise RuntimeError(f"the fused CPU step was required (LearnedOptimizer(fused=True), LSTMRule(kernel=True)) "
                               f"but cannot run: {reason}; leave it at None to fall back to torch ops")
        return None

    def _check_state_sizes(self, grads: Sequence[Tensor], state: RuleState) -> None:
        """The kernel writes every state tensor in full: one that does not fit its gradient (a state loaded from
        another model or another sharding) is an error here, never memory written out of bounds."""
        config = self.net.config
        for g, s in zip(grads, state):
            n = g.numel()
            layers = (config.num_layers, n, config.hidden_size)
            expected: dict[str, tuple[int, ...]] = {"h": layers, "c": layers}
            if config.uses_moments:
                expected.update(m=(len(config.momentum_decays), n), v=(n,))
            wrong = [k for k, shape in expected.items() if tuple(s[k].shape) != shape]
            if wrong:
                raise ValueError(f"the optimizer state {wrong} has shape {tuple(s[wrong[0]].shape)} but a parameter "
                                 f"of {n} coordinates needs {expected[wrong[0]]}: was the state loaded from another "
                                 "model or another sharding?")

    def _kernel_library(self, state_dtype: torch.dtype) -> Any:
        config = self.net.config
        return _kernel.load(
            H=config.hidden_size, LAYERS=config.num_layers, NK=len(config.momentum_decays),
            PAPER=int(config.inputs == "paper"), ADAM=int(config.output == "adam"), OUT=self.net.head.out_features,
            BF16=int(state_dtype == torch.bfloat16), GP=_padded(4 * config.hidden_size),
        )

    def _kernel_update(
        self, libraries: dict[torch.dtype, Any], grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor]
    ) -> tuple[list[Tensor], RuleState]:
        """:meth:`update` in place through the fused kernel, one call per tensor: the same state entries, the
        same results within float rounding."""
        config = self.net.config
        weights, head = self._kernel_weights()
        scalars: dict[float, Tensor] = {}  # per step count: parameters usually share it
        updates, new_state = [], []
        for g, s, p in zip(grads, state, params):
            grad = g.detach().reshape(-1).to(torch.float32).contiguous()
            update = torch.empty_like(grad)
            step = s["step"] + 1 if config.uses_moments else None
            key = float(step) if step is not None else 0.0
            if key not in scalars:
                scalars[key] = self._kernel_scalars(step)
            pointers = [grad, s["h"], s["c"], *((s["m"], s["v"]) if step is not None else (None, None)), update,
                        weights, head, scalars[key]]
            args = _kernel.StepArgs(len(grad), *_pointers(pointers))
            skipped = libraries[s["h"].dtype].lstm_step(args, _kernel_threads(len(grad)))
            updates.append(update.reshape(p.shape).to(p.dtype))
            new = {"h": s["h"], "c": s["c"], "nonfinite": s["nonfinite"] + skipped}
            new_state.append({**new, **({"m": s["m"], "v": s["v"], "step": step} if step is not None else {})})
        return updates, new_state

    def _kernel_weights(self) -> tuple[Tensor, Tensor]:
        """The kernel's weights: every layer's :func:`_transposed` gate weight in one buffer, and the head's
        ``(outputs, H + 1)`` with its bias last."""
        layers = [_transposed(_gate_weight(cast(nn.LSTMCell, cell))).reshape(-1) for cell in self.net.cells]
        head = self.net.head
        return torch.cat(layers), torch.cat((head.weight, head.bias.unsqueeze(1)), 1).detach().contiguous()

    def _kernel_scalars(self, step: Tensor | None) -> Tensor:
        """The kernel's float32 constants (``scalars[]`` in ``_lstm_kernel.c``), rounded as the torch path rounds
        them: the bias corrections come from the same float32 tensor expressions as :func:`_moment_features`."""
        config = self.net.config
        k = len(config.momentum_decays)
        values = torch.zeros(23, dtype=torch.float32)
        values[:7] = torch.tensor([
            config.rms_decay, 1.0, config.output_scale, math.log(config.magnitude_range), config.preprocess_p,
            math.exp(-config.preprocess_p), math.exp(config.preprocess_p),
        ], dtype=torch.float32)
        decays = torch.tensor(config.momentum_decays, dtype=torch.float32)
        values[7 : 7 + k] = decays
        if step is not None:
            values[1] = 1 - config.rms_decay**step
            values[15 : 15 + k] = 1 - decays**step
        return values

    def _chunk_results(
        self, features: list[Tensor], hs: list[Tensor], cs: list[Tensor], finite: list[Tensor | None]
    ) -> Iterator[tuple[int, slice, Tensor, Tensor, Tensor]]:
        """Run the net on every chunk of the flat batch; yield ``(tensor, rows, raw output, new h, new c)`` for each
        piece (states ``(layers, rows, hidden)``), with non-finite coordinates given their old state."""
        dtype = self.compute_dtype
        for pieces in self._plan([len(x) for x in features]):
            if len(pieces) == 1:
                i, rows = pieces[0]
                if rows.stop - rows.start == len(features[i]):  # the whole tensor: no slice node for autograd
                    inputs = features[i], hs[i].to(dtype), cs[i].to(dtype)
                else:
                    inputs = features[i][rows], hs[i][:, rows].to(dtype), cs[i][:, rows].to(dtype)
            else:
                inputs = (
                    torch.cat([features[i][rows] for i, rows in pieces]),
                    torch.cat([hs[i][:, rows].to(dtype) for i, rows in pieces], dim=1),
                    torch.cat([cs[i][:, rows].to(dtype) for i, rows in pieces], dim=1),
                )
            raw, new_h, new_c = self._step_function(len(inputs[0]))(*inputs)
            offset = 0
            for i, rows in pieces:
                part = slice(offset, offset + rows.stop - rows.start)
                offset = part.stop
                whole = part.start == 0 and part.stop == len(raw)  # no slice node for autograd
                r, h_new, c_new = (raw, new_h, new_c) if whole else (raw[part], new_h[:, part], new_c[:, part])
                mask = finite[i]
                if mask is not None:
                    keep = mask[rows].unsqueeze(-1)
                    h_new = torch.where(keep, h_new, hs[i][:, rows])
                    c_new = torch.where(keep, c_new, cs[i][:, rows])
                yield i, rows, r, h_new, c_new

    def _run_in_place(
        self, features: list[Tensor], hs: list[Tensor], cs: list[Tensor], finite: list[Tensor | None], inplace: bool
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Without autograd: one copy straight into the new state (or the old one, if ``inplace``)."""
        outputs = self.net.head.out_features
        raws = [x.new_empty(len(x), outputs) for x in features]
        new_hs = hs if inplace else [torch.empty_like(h) for h in hs]
        new_cs = cs if inplace else [torch.empty_like(c) for c in cs]
        for i, rows, r, h_new, c_new in self._chunk_results(features, hs, cs, finite):
            raws[i][rows] = r
            new_hs[i][:, rows] = h_new
            new_cs[i][:, rows] = c_new
        return raws, new_hs, new_cs

    def _run_differentiable(
        self, features: list[Tensor], hs: list[Tensor], cs: list[Tensor], finite: list[Tensor | None]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """With autograd (the unroll engine): pieces are concatenated, never written in place."""
        parts: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in features]
        for i, _, r, h_new, c_new in self._chunk_results(features, hs, cs, finite):
            parts[i].append((r, h_new, c_new))
        raws, new_hs, new_cs = [], [], []
        for x, h, c, pieces in zip(features, hs, cs, parts):
            if not pieces:  # an empty tensor
                raws.append(x.new_zeros(0, self.net.head.out_features))
                new_hs.append(h)
                new_cs.append(c)
                continue
            if len(pieces) == 1:  # the usual case: no concatenation copy (torch.cat copies even one tensor)
                raw, h_out, c_out = pieces[0]
            else:
                raw = torch.cat([p[0] for p in pieces])
                h_out, c_out = (torch.cat([p[k] for p in pieces], dim=1) for k in (1, 2))
            raws.append(raw)
            new_hs.append(h_out.to(h.dtype))
            new_cs.append(c_out.to(c.dtype))
        return raws, new_hs, new_cs

    def _step_function(self, rows: int) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """The net's step, compiled for full chunks when asked (one static shape: no recompiles, no guards on
        sizes); a last, partial chunk and every differentiable call run eagerly."""
        if torch.is_grad_enabled():
            return partial(self.net.step, fused=self.fused, kernel=self.kernel is not False)
        if not self.compile or rows != self.chunk_size:
            return self.net.step
        if self._compiled is None:
            self._compiled = torch.compile(self.net.step, dynamic=False)
        return self._compiled

    def _plan(self, sizes: Sequence[int]) -> list[list[tuple[int, slice]]]:
        """Split all tensors' coordinates into chunks of at most ``chunk_size`` rows.

        Each chunk is a list of ``(tensor index, row range)`` pieces. A tensor of at least ``chunk_size // 4``
        coordinates gets chunks of its own, each a single piece whose rows are views (no copy in, no copy out);
        smaller tensors are packed together, several pieces per chunk, so that a model with hundreds of biases
        costs a few LSTM calls.
        """
        chunks: list[list[tuple[int, slice]]] = []
        current: list[tuple[int, slice]] = []
        filled = 0
        for index, n in enumerate(sizes):
            if n >= max(self.chunk_size // 4, 1):
                chunks.extend([(index, slice(s, min(s + self.chunk_size, n)))] for s in range(0, n, self.chunk_size))
                continue
            if n and filled + n > self.chunk_size:
                chunks.append(current)
                current, filled = [], 0
            if n:
                current.append((index, slice(0, n)))
                filled += n
        if current:
            chunks.append(current)
        return chunks
