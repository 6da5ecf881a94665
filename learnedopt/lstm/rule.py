"""The LSTM optimizer as an update rule: features from gradients, the net over the flat batch, updates out."""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..rules import ParamState, RuleState
from . import chunks
from .config import check_backend
from .features import largest_gradient, moment_features, preprocess_gradient
from .kernel_ops import KernelStep
from .net import CoordinatewiseLSTM
from .triton_step import TritonStep

__all__ = ["LSTMRule"]


class LSTMRule:
    """The LSTM optimizer as an update rule (see :mod:`learnedopt.rules`).

    All coordinates of all tensors passed to :meth:`update` form one flat batch, processed in chunks of
    ``chunk_size`` rows (:mod:`learnedopt.lstm.chunks`). Parameters never leave their device.

    Computation runs in the net's dtype; the hidden state is stored in ``state_dtype`` (default: the net's dtype)
    and the update is returned in each parameter's dtype. Nets with running moments (``config.uses_moments``)
    keep them, and a step count, in the net's dtype: ``"m"`` ``(K, N)``, ``"v"`` ``(N,)``, ``"step"``.

    ``backend`` is where the math runs (:data:`~learnedopt.lstm.BACKENDS`). ``"auto"`` (default): a fused kernel
    wherever one applies — a step without autograd (the optimizer's in-place step, evaluation unrolls under
    ``torch.no_grad``) with a float32 net and a float32 or bfloat16 state runs as one kernel call per tensor (C on
    CPUs, Triton on CUDA), and under autograd all LSTM layers of a step on float32 CPU tensors run as one C-kernel
    node — torch ops elsewhere, differentiated by hand-written backward nodes. ``"kernel"``: the step without autograd
    requires the kernel (an error says why it cannot run). ``"torch"``: torch ops only. ``"reference"``: torch
    ops as autograd records them op by op, the reference every other backend equals within float rounding
    (``tests/test_kernel.py``, ``tests/test_lstm.py``). A step traced by :func:`torch.compile` runs the torch ops.
    ``compile=True`` runs the torch ops' forward through :func:`torch.compile` when autograd is off (fused gate
    math; results equal within float rounding).

    Non-finite gradients: a coordinate whose gradient is NaN, +-Inf or larger in magnitude than
    :func:`~learnedopt.lstm.largest_gradient` (its square would overflow the second moment) gets a zero update
    and keeps its previous hidden state and moments, so a bad gradient never poisons a parameter or the state;
    ``state["nonfinite"]`` counts how many coordinate-steps were skipped this way.

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
        backend: str = "auto",
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        check_backend(backend)
        self.net = net
        self.state_dtype = state_dtype
        self.chunk_size = chunk_size
        self.compile = compile
        self.backend = backend
        self._compiled: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.net.head.weight.dtype

    def __getstate__(self) -> dict:
        """Copies and pickles drop the compiled step (it is rebuilt on first use)."""
        return {**self.__dict__, "_compiled": None}

    def init(self, params: Sequence[Tensor]) -> RuleState:
        dtype = self.state_dtype or self.compute_dtype
        state = []
        for p in params:
            h, c = self.net.initial_state(p.numel(), dtype=dtype, device=p.device)
            s = {"h": h, "c": c, "nonfinite": torch.zeros((), dtype=torch.int64, device=p.device)}
            if self.net.config.uses_moments:
                shapes, compute = self.net.state_shapes(p.numel()), self.compute_dtype
                s.update({k: torch.zeros(shapes[k], dtype=compute, device=p.device) for k in ("m", "v")})
                s["step"] = torch.zeros((), dtype=compute, device=p.device)
            state.append(s)
        return state

    def update(
        self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor], *, inplace: bool = False
    ) -> tuple[list[Tensor], RuleState]:
        """The updates and the new state; ``inplace=True`` writes the new state into ``state``'s tensors.

        In-place is what :class:`~learnedopt.LearnedOptimizer` uses under ``torch.no_grad``: the caller gives up
        the old state, and the step allocates no new hidden state (fresh multi-megabyte buffers cost page faults
        on every step). The default keeps the rule pure, as the unroll engine needs.
        """
        if inplace and torch.is_grad_enabled() and any(s["h"].requires_grad for s in state):
            raise RuntimeError("inplace=True cannot overwrite a hidden state that autograd tracks; use inplace=False")
        # under torch.compile the torch ops are what gets traced: an opaque C call would break the graph
        if (not torch.is_grad_enabled() and self.backend in ("auto", "kernel")
                and not torch.compiler.is_compiling()):
            fused = self._fused_step(grads, state)
            if fused is not None:
                if not inplace:  # pure: the kernel updates copies (one pass over the state, still far cheaper)
                    state = [{k: v.clone() if k in ("h", "c", "m", "v") else v for k, v in s.items()} for s in state]
                return fused(grads, state, params)
        config = self.net.config
        features, finite, nominals, seens, moments = _inputs(self.net, grads, state, self.compute_dtype)
        hs, cs = [s["h"] for s in state], [s["c"] for s in state]
        step, outputs = self._step_function, self.net.head.out_features
        if torch.is_grad_enabled() and not inplace:
            raws, new_hs, new_cs = chunks.run_differentiable(
                step, self.chunk_size, self.compute_dtype, outputs, features, hs, cs, finite)
        else:
            raws, new_hs, new_cs = chunks.run_without_autograd(
                step, self.chunk_size, self.compute_dtype, outputs, features, hs, cs, finite, inplace)
        updates, new_state = [], []
        for i, (s, p, keep) in enumerate(zip(state, params, finite)):
            nominal, seen = (nominals[i], seens[i]) if config.uses_moments else (None, None)
            u = self.net.to_update(raws[i], nominal, seen, backend=self.backend)
            if keep is not None:
                u = torch.where(keep, u, 0.0)
            updates.append(u.reshape(p.shape).to(p.dtype))
            skipped = (~keep).sum() if keep is not None else 0
            new = {"h": new_hs[i], "c": new_cs[i], "nonfinite": s["nonfinite"] + skipped}
            new_state.append({**new, **(moments[i] if config.uses_moments else {})})
        return updates, new_state

    def _fused_step(
        self, grads: Sequence[Tensor], state: RuleState
    ) -> Callable[..., tuple[list[Tensor], RuleState]] | None:
        """The whole in-place step as one kernel per tensor: C on CPUs (:class:`KernelStep`), Triton on CUDA
        (:class:`~learnedopt.lstm.triton_step.TritonStep`); ``None`` where neither runs (``backend="kernel"``
        raises instead, saying why)."""
        required = self.backend == "kernel"
        if grads and grads[0].device.type == "cuda":
            triton = TritonStep(self.net)
            reason = triton.why_not(grads, state)
            if reason is not None and required:
                raise RuntimeError(f"backend='kernel' was asked for, but the Triton step cannot run: {reason}; use "
                                   "backend='auto' to fall back to torch ops")
            return triton if reason is None else None
        kernel = KernelStep(self.net)
        libraries = kernel.libraries(grads, state, required)
        return None if libraries is None else partial(kernel, libraries)

    def _step_function(self, rows: int) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """The net's step for a chunk of ``rows``, compiled for full chunks when asked (one static shape: no
        recompiles, no guards on sizes); a last, partial chunk and every differentiable call run eagerly."""
        if torch.is_grad_enabled():
            return partial(self.net.step, backend=self.backend)
        if not self.compile or rows != self.chunk_size:
            return partial(self.net.step, backend="torch")
        if self._compiled is None:
            self._compiled = torch.compile(partial(self.net.step, backend="torch"), dynamic=False)
        return self._compiled


def _inputs(
    net: CoordinatewiseLSTM, grads: Sequence[Tensor], state: RuleState, dtype: torch.dtype
) -> tuple[list[Tensor], list[Tensor | None], list[Tensor], list[Tensor], list[ParamState]]:
    """Every tensor's features ``(N, inputs)`` and mask of finite gradients (``None``: all finite), and, for nets
    with moments, the nominal Adam directions, ``seen`` masks and new moment states."""
    config = net.config
    flat = [g.reshape(-1).to(dtype) for g in grads]
    limit = largest_gradient(dtype)
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
        device: torch.tensor(config.momentum_decays, dtype=dtype, device=device).unsqueeze(1)
        for device in ({g.device for g in flat} if config.uses_moments else ())
    }
    for g, s, keep in zip(flat, state, finite):
        if config.uses_moments:
            x, nominal, seen, moment_state = moment_features(config, decays[g.device], g, s, keep)
            nominals.append(nominal)
            seens.append(seen)
            moments.append(moment_state)
        if config.inputs == "paper":
            x = preprocess_gradient(g, config.preprocess_p)
        features.append(x)
    return features, finite, nominals, seens, moments
