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
from typing import Callable, Iterator, Sequence, cast

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
        update, hs, cs = self.step(grad, state[0], state[1])
        return update, (torch.stack(hs), torch.stack(cs))

    def step(self, grad: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """:meth:`forward` with the new state as one ``(N, hidden_size)`` tensor per layer (no stacking copy)."""
        x = preprocess_gradient(grad, self.config.preprocess_p)
        new_h, new_c = [], []
        for layer, cell in enumerate(self.cells):
            x, cl = _lstm_cell(cast(nn.LSTMCell, cell), x, h[layer], c[layer])
            new_h.append(x)
            new_c.append(cl)
        update = self.head(x).squeeze(-1) * self.config.output_scale
        return update, new_h, new_c


def _lstm_cell(cell: nn.LSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``nn.LSTMCell``'s math with one matmul for inputs, state and bias, and one contiguous sigmoid.

    On CPUs the stock cell applies sigmoid to strided gate slices, which does not vectorize; computing it over
    the whole contiguous gate matrix (the cell-gate columns are wasted work) is ~1.6x faster per step. The bias
    rides in the matmul as a column of ones: ``addmm`` would first copy the broadcast bias into every row.
    """
    size = cell.hidden_size
    weight = torch.cat((cell.weight_ih, cell.weight_hh, (cell.bias_ih + cell.bias_hh).unsqueeze(1)), dim=1)
    gates = torch.mm(torch.cat((x, h, torch.ones_like(h[:, :1])), dim=1), weight.t())
    sig = torch.sigmoid(gates)  # gate order of nn.LSTMCell: input, forget, cell, output
    candidate = torch.tanh(gates[:, 2 * size : 3 * size])
    new_c = torch.addcmul(sig[:, size : 2 * size] * c, sig[:, :size], candidate)
    new_h = sig[:, 3 * size :] * torch.tanh(new_c)
    return new_h, new_c


class LSTMRule:
    """The LSTM optimizer as an update rule (see :mod:`learnedopt.rules`).

    All coordinates of all tensors passed to :meth:`update` form one flat batch, processed in chunks of
    ``chunk_size`` rows (the multi-tensor idea of ``torch.optim``'s ``foreach`` paths): a large tensor is split
    across chunks, small tensors (biases, norms) share one, so a model with hundreds of small tensors costs a
    few LSTM calls rather than hundreds, and a chunk's working set stays in cache. Parameters never leave their
    device.

    Computation runs in the net's dtype; the hidden state is stored in ``state_dtype`` (default: the net's dtype)
    and the update is returned in each parameter's dtype. ``compile=True`` runs the net through
    :func:`torch.compile` when autograd is off (the :class:`~learnedopt.LearnedOptimizer` path; the
    differentiable unroll keeps eager mode, which supports second-order gradients); it fuses the gate
    nonlinearities and the cell update and changes results only within float rounding (on a CPU it measured no
    faster than eager mode: results/performance.md).

    Non-finite gradients: a coordinate whose gradient is NaN or +-Inf gets a zero update and keeps its previous
    hidden state, so a bad gradient never poisons a parameter or the state; ``state["nonfinite"]`` counts how
    many coordinate-steps were skipped this way.

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
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.net = net
        self.state_dtype = state_dtype
        self.chunk_size = chunk_size
        self.compile = compile
        self._compiled: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, list[Tensor], list[Tensor]]] | None = None

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
        self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor], *, inplace: bool = False
    ) -> tuple[list[Tensor], RuleState]:
        """The updates and the new state; ``inplace=True`` writes the new hidden state into ``state``'s tensors.

        In-place is what :class:`~learnedopt.LearnedOptimizer` uses under ``torch.no_grad``: the caller gives up
        the old state, and the step allocates no new 320 bytes per coordinate (fresh multi-megabyte buffers cost
        page faults on every step). The default keeps the rule pure, as the unroll engine needs.
        """
        if inplace and torch.is_grad_enabled() and any(s["h"].requires_grad for s in state):
            raise RuntimeError("inplace=True cannot overwrite a hidden state that autograd tracks; use inplace=False")
        flat = [g.reshape(-1) for g in grads]
        masks = [torch.isfinite(g) for g in flat]
        # one host sync for the whole group, not one per tensor (each would stall a GPU's queue)
        clean = torch.stack([m.all() for m in masks]).tolist() if masks else []
        finite = [None if ok else m for ok, m in zip(clean, masks)]
        flat = [(g if ok else torch.where(m, g, 0.0)).to(self.compute_dtype) for g, ok, m in zip(flat, clean, masks)]
        hs, cs = [s["h"] for s in state], [s["c"] for s in state]
        if torch.is_grad_enabled() and not inplace:
            updates, new_hs, new_cs = self._run_differentiable(flat, hs, cs, finite)
        else:
            updates, new_hs, new_cs = self._run_in_place(flat, hs, cs, finite, inplace)
        new_state = []
        for s, h, c, finite_mask in zip(state, new_hs, new_cs, finite):
            skipped = (~finite_mask).sum() if finite_mask is not None else 0
            new_state.append({"h": h, "c": c, "nonfinite": s["nonfinite"] + skipped})
        return [u.reshape(p.shape).to(p.dtype) for u, p in zip(updates, params)], new_state

    def _chunk_results(
        self, flat: list[Tensor], hs: list[Tensor], cs: list[Tensor], finite: list[Tensor | None]
    ) -> Iterator[tuple[int, slice, Tensor, list[Tensor], list[Tensor]]]:
        """Run the net on every chunk of the flat batch; yield ``(tensor, rows, update, h per layer, c per layer)``
        for each piece, with non-finite coordinates given a zero update and their old state."""
        dtype = self.compute_dtype
        for pieces in self._plan([g.numel() for g in flat]):
            if len(pieces) == 1:
                i, rows = pieces[0]
                inputs = flat[i][rows], hs[i][:, rows].to(dtype), cs[i][:, rows].to(dtype)
            else:
                inputs = (
                    torch.cat([flat[i][rows] for i, rows in pieces]),
                    torch.cat([hs[i][:, rows].to(dtype) for i, rows in pieces], dim=1),
                    torch.cat([cs[i][:, rows].to(dtype) for i, rows in pieces], dim=1),
                )
            update, new_h, new_c = self._step_function(inputs[0].numel())(*inputs)
            offset = 0
            for i, rows in pieces:
                part = slice(offset, offset + rows.stop - rows.start)
                offset = part.stop
                u, h_new, c_new = update[part], [h[part] for h in new_h], [c[part] for c in new_c]
                mask = finite[i]
                if mask is not None:
                    keep = mask[rows]
                    u = torch.where(keep, u, 0.0)
                    h_new = [torch.where(keep.unsqueeze(-1), h, old) for h, old in zip(h_new, hs[i][:, rows])]
                    c_new = [torch.where(keep.unsqueeze(-1), c, old) for c, old in zip(c_new, cs[i][:, rows])]
                yield i, rows, u, h_new, c_new

    def _run_in_place(
        self, flat: list[Tensor], hs: list[Tensor], cs: list[Tensor], finite: list[Tensor | None], inplace: bool
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Without autograd: one copy per layer, straight into the new state (or the old one, if ``inplace``)."""
        updates = [torch.empty_like(g) for g in flat]
        new_hs = hs if inplace else [torch.empty_like(h) for h in hs]
        new_cs = cs if inplace else [torch.empty_like(c) for c in cs]
        for i, rows, u, h_new, c_new in self._chunk_results(flat, hs, cs, finite):
            updates[i][rows] = u
            for layer, (h, c) in enumerate(zip(h_new, c_new)):
                new_hs[i][layer, rows] = h
                new_cs[i][layer, rows] = c
        return updates, new_hs, new_cs

    def _run_differentiable(
        self, flat: list[Tensor], hs: list[Tensor], cs: list[Tensor], finite: list[Tensor | None]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """With autograd (the unroll engine): pieces are concatenated, never written in place."""
        parts: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in flat]
        for i, _, u, h_new, c_new in self._chunk_results(flat, hs, cs, finite):
            parts[i].append((u, torch.stack(h_new), torch.stack(c_new)))
        updates, new_hs, new_cs = [], [], []
        for g, h, c, pieces in zip(flat, hs, cs, parts):
            if not pieces:  # an empty tensor
                updates.append(torch.zeros_like(g))
                new_hs.append(h)
                new_cs.append(c)
                continue
            updates.append(torch.cat([p[0] for p in pieces]))
            new_hs.append(torch.cat([p[1] for p in pieces], dim=1).to(h.dtype))
            new_cs.append(torch.cat([p[2] for p in pieces], dim=1).to(c.dtype))
        return updates, new_hs, new_cs

    def _step_function(self, rows: int) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, list[Tensor], list[Tensor]]]:
        """The net's step, compiled for full chunks when asked (one static shape: no recompiles, no guards on
        sizes); a last, partial chunk and every differentiable call run eagerly."""
        if not self.compile or torch.is_grad_enabled() or rows != self.chunk_size:
            return self.net.step
        if self._compiled is None:
            self._compiled = torch.compile(self.net.step, dynamic=False)
        return self._compiled

    def _plan(self, sizes: Sequence[int]) -> list[list[tuple[int, slice]]]:
        """Split the concatenation of all tensors' coordinates into chunks of ``chunk_size`` rows.

        Each chunk is a list of ``(tensor index, row range)`` pieces: one piece where a chunk lies inside one
        tensor (its rows are then views, with no copy), several where small tensors share a chunk.
        """
        chunks: list[list[tuple[int, slice]]] = []
        current: list[tuple[int, slice]] = []
        filled = 0
        for index, n in enumerate(sizes):
            start = 0
            while start < n:
                take = min(n - start, self.chunk_size - filled)
                current.append((index, slice(start, start + take)))
                filled, start = filled + take, start + take
                if filled == self.chunk_size:
                    chunks.append(current)
                    current, filled = [], 0
        if current:
            chunks.append(current)
        return chunks
