"""The LSTM's inputs: the paper's gradient preprocessing and the normalized gradient and momenta (with the running
moments they need), plus the bound above which a gradient counts as non-finite."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..rules import ParamState
from .config import LSTMConfig

__all__ = ["largest_gradient", "preprocess_gradient", "moment_features", "EPS"]

EPS = 1e-8  # added to sqrt(v_hat), as Adam's eps


def largest_gradient(dtype: torch.dtype) -> float:
    """The largest gradient magnitude the rule takes in ``dtype``: a power of two whose square, and any running
    average of such squares, stays finite (``2^63`` for float32, ``2^511`` for float64). Larger ones are skipped
    as non-finite, the same way in the torch ops and the C kernel (``lstm_kernel.c``'s ``GRAD_LIMIT``)."""
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



def moment_features(
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
    # the square root of a clamped v: where v = 0 (a coordinate whose gradients were all zero) its derivative
    # would be infinite, and second-order meta-gradients (gradients that depend on the parameters) would turn NaN;
    # in the forward pass the clamp changes nothing, sqrt(tiny) being far below EPS
    scale = 1.0 / (torch.sqrt((v / (1 - beta2**step)).clamp_min(torch.finfo(v.dtype).tiny)) + EPS)
    normed = m / (1 - decays**step) * scale
    features = torch.stack((grad * scale, *normed.unbind(0)), dim=1)  # (N, 1 + K), contiguous for the kernel
    return features, normed[0], v > 0, {"m": m, "v": v, "step": step}

