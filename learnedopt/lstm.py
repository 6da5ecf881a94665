"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016), as a net and as an update rule.

One small LSTM is applied to every coordinate of every parameter as a batch: the weights are shared, the hidden
state is per coordinate. This file holds the only copy of that math; :class:`learnedopt.LearnedOptimizer` and the
unroll engine both call :class:`LSTMRule`.

Reference: M. Andrychowicz et al., "Learning to learn by gradient descent by gradient descent", NeurIPS 2016
(Section 2.1 for the architecture, Appendix A for the gradient preprocessing).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence, cast

import torch
from torch import Tensor, nn

from .rules import RuleState

__all__ = ["LSTMConfig", "CoordinatewiseLSTM", "LSTMRule", "preprocess_gradient"]


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
    """Architecture of a :class:`CoordinatewiseLSTM`; saved beside the weights so a file rebuilds its net."""

    hidden_size: int = 20
    num_layers: int = 2
    preprocess_p: float = 10.0
    output_scale: float = 0.1


class CoordinatewiseLSTM(nn.Module):
    """A 2-layer LSTM (20 units by default) that maps each coordinate's gradient to that coordinate's update.

    Input: a flat gradient ``(N,)`` and hidden state ``h, c`` of shape ``(num_layers, N, hidden_size)``.
    Output: the update ``(N,)`` (already multiplied by ``output_scale``) and the new ``h, c``.

    Example:
        >>> net = CoordinatewiseLSTM()
        >>> h, c = net.initial_state(5)
        >>> update, (h, c) = net(torch.randn(5), (h, c))
        >>> update.shape, h.shape
        (torch.Size([5]), torch.Size([2, 5, 20]))
    """

    def __init__(self, config: LSTMConfig | None = None, **overrides: float) -> None:
        super().__init__()
        config = LSTMConfig(**{**asdict(config or LSTMConfig()), **overrides})
        if config.hidden_size < 1 or config.num_layers < 1:
            raise ValueError(f"hidden_size and num_layers must be >= 1, got {config}")
        self.config = config
        sizes = [2] + [config.hidden_size] * config.num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(i, config.hidden_size) for i in sizes[:-1])
        self.head = nn.Linear(config.hidden_size, 1)

    def initial_state(
        self, n: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """Zero hidden and cell state for ``n`` coordinates."""
        ref = self.head.weight
        shape = (self.config.num_layers, n, self.config.hidden_size)
        zeros = torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)
        return zeros, zeros.clone()

    def forward(self, grad: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, c = state
        x = preprocess_gradient(grad, self.config.preprocess_p)
        new_h, new_c = [], []
        for layer, cell in enumerate(self.cells):
            x, cl = _lstm_cell(cast(nn.LSTMCell, cell), x, h[layer], c[layer])
            new_h.append(x)
            new_c.append(cl)
        update = self.head(x).squeeze(-1) * self.config.output_scale
        return update, (torch.stack(new_h), torch.stack(new_c))


def _lstm_cell(cell: nn.LSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``nn.LSTMCell``'s math with one matmul for both inputs and one contiguous sigmoid over all gates.

    On CPUs the stock cell applies sigmoid to strided gate slices, which does not vectorize; computing it over
    the whole contiguous gate matrix (the cell-gate columns are wasted work) is ~1.6x faster per step.
    """
    size = cell.hidden_size
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1)
    gates = torch.addmm(cell.bias_ih + cell.bias_hh, torch.cat((x, h), dim=1), weight.t())
    sig = torch.sigmoid(gates)  # gate order of nn.LSTMCell: input, forget, cell, output
    candidate = torch.tanh(gates[:, 2 * size : 3 * size])
    new_c = torch.addcmul(sig[:, size : 2 * size] * c, sig[:, :size], candidate)
    new_h = sig[:, 3 * size :] * torch.tanh(new_c)
    return new_h, new_c


class LSTMRule:
    """The LSTM optimizer as an update rule (see :mod:`learnedopt.rules`).

    Computation runs in the net's dtype; the hidden state is stored in ``state_dtype`` (default: the net's dtype)
    and the update is returned in each parameter's dtype. Coordinates are processed in chunks of ``chunk_size``
    rows, which keeps the LSTM's working set in cache.

    Non-finite gradients: a coordinate whose gradient is NaN or +-Inf gets a zero update and keeps its previous
    hidden state, so a bad gradient never poisons a parameter or the state; ``state["nonfinite"]`` counts how
    many coordinate-steps were skipped this way.

    Example:
        >>> rule = LSTMRule(CoordinatewiseLSTM())
        >>> params = [torch.zeros(3, 4)]
        >>> state = rule.init(params)
        >>> updates, state = rule.update([torch.ones(3, 4)], state, params)
        >>> updates[0].shape, state[0]["h"].shape
        (torch.Size([3, 4]), torch.Size([2, 12, 20]))
    """

    def __init__(
        self, net: CoordinatewiseLSTM, state_dtype: torch.dtype | None = None, chunk_size: int = 16384
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.net = net
        self.state_dtype = state_dtype
        self.chunk_size = chunk_size

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.net.head.weight.dtype

    def init(self, params: Sequence[Tensor]) -> RuleState:
        dtype = self.state_dtype or self.compute_dtype
        state = []
        for p in params:
            h, c = self.net.initial_state(p.numel(), dtype=dtype, device=p.device)
            state.append({"h": h, "c": c, "nonfinite": torch.zeros((), dtype=torch.int64, device=p.device)})
        return state

    def update(
        self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor]
    ) -> tuple[list[Tensor], RuleState]:
        updates, new_state = [], []
        for g, s, p in zip(grads, state, params):
            update, h, c, skipped = self._update_one(g.reshape(-1), s["h"], s["c"])
            updates.append(update.reshape(p.shape).to(p.dtype))
            new_state.append({"h": h, "c": c, "nonfinite": s["nonfinite"] + skipped})
        return updates, new_state

    def _chunks(self, n: int) -> list[slice]:
        return [slice(start, start + self.chunk_size) for start in range(0, n, self.chunk_size)]

    def _update_one(self, g: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dtype = self.compute_dtype
        store = h.dtype
        if g.numel() == 0:
            return torch.zeros_like(g), h, c, torch.zeros((), dtype=torch.int64, device=g.device)
        finite = torch.isfinite(g)
        all_finite = bool(finite.all())
        g = g.to(dtype) if all_finite else torch.where(finite, g, 0.0).to(dtype)
        if g.numel() <= self.chunk_size:
            update, (new_h, new_c) = self.net(g, (h.to(dtype), c.to(dtype)))
            new_h, new_c = new_h.to(store), new_c.to(store)
        elif torch.is_grad_enabled():
            outs, hs, cs = [], [], []
            for rows in self._chunks(g.numel()):
                u, (hc, cc) = self.net(g[rows], (h[:, rows].to(dtype), c[:, rows].to(dtype)))
                outs.append(u)
                hs.append(hc)
                cs.append(cc)
            update, new_h, new_c = torch.cat(outs), torch.cat(hs, dim=1).to(store), torch.cat(cs, dim=1).to(store)
        else:  # the in-place optimizer's path: write each chunk straight into the new state (one copy, not two)
            update, new_h, new_c = torch.empty_like(g), torch.empty_like(h), torch.empty_like(c)
            for rows in self._chunks(g.numel()):
                update[rows], (new_h[:, rows], new_c[:, rows]) = self.net(
                    g[rows], (h[:, rows].to(dtype), c[:, rows].to(dtype))
                )
        if all_finite:
            return update, new_h, new_c, torch.zeros((), dtype=torch.int64, device=g.device)
        keep = finite.unsqueeze(-1)
        return (
            torch.where(finite, update, 0.0),
            torch.where(keep, new_h, h),
            torch.where(keep, new_c, c),
            (~finite).sum(),
        )
