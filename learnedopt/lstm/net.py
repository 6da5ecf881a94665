"""The coordinatewise LSTM itself: an ``nn.Module`` from per-coordinate input features to the head's raw outputs,
and the output maps from raw outputs to updates."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import cast

import torch
from torch import Tensor, nn

from .cell import gate_weight, lstm_cell
from .config import LSTMConfig
from .kernel_ops import FusedLSTM, cell_library
from .output import BoundedAdamStep, bounded_adam_step
from .triton_cell import TritonCell, triton_cell_applies

__all__ = ["CoordinatewiseLSTM"]


class CoordinatewiseLSTM(nn.Module):
    """A 2-layer LSTM (20 units by default) that maps each coordinate's input features to raw outputs.

    Input: features ``(N, config.input_size)`` and hidden state ``h, c`` of shape ``(num_layers, N, hidden_size)``.
    Output: the head's raw outputs ``(N, 1)`` (``output="linear"``) or ``(N, 2)`` (``output="adam"``) and the new
    ``h, c``. :class:`LSTMRule` computes the features from gradients and turns raw outputs into updates.

    Example:
        >>> from learnedopt import preprocess_gradient
        >>> net = CoordinatewiseLSTM()
        >>> h, c = net.initial_state(5)
        >>> raw, (h, c) = net(preprocess_gradient(torch.randn(5)), (h, c))
        >>> raw.shape, h.shape
        (torch.Size([5, 1]), torch.Size([2, 5, 20]))
    """

    def __init__(self, config: LSTMConfig | None = None, **overrides: object) -> None:
        super().__init__()
        if config is None:
            config = LSTMConfig(**overrides)  # type: ignore[arg-type]
        elif overrides:
            config = replace(config, **overrides)  # type: ignore[arg-type]
        self.config = config
        sizes = [config.input_size] + [config.hidden_size] * config.num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(i, config.hidden_size) for i in sizes[:-1])
        self.head = nn.Linear(config.hidden_size, 1 if config.output == "linear" else 2)
        if config.output == "adam":  # untrained, the rule is exactly its nominal Adam step
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def state_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        """The shape of every per-coordinate state tensor the rule keeps for a parameter of ``n`` coordinates."""
        config = self.config
        layers = (config.num_layers, n, config.hidden_size)
        shapes: dict[str, tuple[int, ...]] = {"h": layers, "c": layers}
        if config.uses_moments:
            shapes.update(m=(len(config.momentum_decays), n), v=(n,))
        return shapes

    def initial_state(
        self, n: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """Zero hidden and cell state for ``n`` coordinates."""
        ref = self.head.weight
        shape = self.state_shapes(n)["h"]
        zeros = torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)
        return zeros, zeros.clone()

    def forward(self, features: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        raw, h, c = self.step(features, state[0], state[1])
        return raw, (h, c)

    def step(self, features: Tensor, h: Tensor, c: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` as ``(raw, new_h, new_c)``, on ``backend`` (see :data:`~learnedopt.lstm.BACKENDS`):
        under autograd, ``"auto"``/``"kernel"`` run all layers as one C-kernel node where it applies, ``"torch"``
        differentiates each cell with its hand-written backward, ``"reference"`` records every op. On CUDA
        ``"auto"``/``"kernel"`` run each cell as one Triton node (:class:`~learnedopt.lstm.triton_cell.TritonCell`)."""
        weights = [gate_weight(cast(nn.LSTMCell, cell)) for cell in self.cells]
        if backend in ("auto", "kernel") and torch.is_grad_enabled():
            library = cell_library(weights, features, h, c)
            if library is not None:
                head = torch.cat((self.head.weight, self.head.bias.unsqueeze(1)), dim=1)
                return FusedLSTM.apply(library, features, h, c, head, *weights)
        # on CUDA under autograd (meta-training), each cell is one Triton node forward and backward
        triton = backend in ("auto", "kernel") and torch.is_grad_enabled() and triton_cell_applies(features, h, c)
        x = features
        hs, cs = [], []
        # unbind, not h[layer]: its backward stacks the layers' gradients once, where indexing would zero-fill and
        # accumulate a full (layers, N, hidden) gradient per layer
        for weight, h_layer, c_layer in zip(weights, h.unbind(0), c.unbind(0)):
            if triton:
                x, cl = TritonCell.apply(weight, x, h_layer, c_layer)
            else:
                x, cl = lstm_cell(weight, x, h_layer, c_layer, reference=backend == "reference")
            hs.append(x)
            cs.append(cl)
        return self.head(x), torch.stack(hs), torch.stack(cs)

    def to_update(self, raw: Tensor, nominal: Tensor | None, seen: Tensor | None, backend: str = "auto") -> Tensor:
        """The additive update ``(N,)`` from the head's raw outputs (see :mod:`learnedopt.lstm` for the maps).

        ``nominal`` is the Adam direction ``m_hat / (sqrt(v_hat) + eps)`` and ``seen`` marks coordinates that have
        had a nonzero gradient; both are needed for ``output="adam"`` only. Under autograd the bounded map is one
        node with a hand-written backward (``backend="reference"``: autograd's op-by-op record). A non-finite raw
        output (only a net with non-finite weights makes one) counts as zero, so the update stays finite and, for
        ``output="adam"``, inside its bound whatever the weights.
        """
        cfg = self.config
        raw = torch.where(torch.isfinite(raw), raw, 0.0)  # a net with non-finite weights still moves safely
        if cfg.output == "linear":
            return raw[:, 0] * cfg.output_scale
        assert nominal is not None and seen is not None
        constants = (math.log(cfg.magnitude_range), cfg.output_scale)
        if backend != "reference" and torch.is_grad_enabled():
            return BoundedAdamStep.apply(raw, nominal, seen, *constants)
        return bounded_adam_step(raw, nominal, seen, *constants)[0]
