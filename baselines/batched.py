"""A meta-batch of tasks as one wider network: Conv-4 with grouped convolutions, no ``vmap``.

Task ``t`` of ``T`` owns channel group ``t`` of every layer: its convolution weights become group ``t`` of a
convolution with ``groups=T``, its BatchNorm normalizes only its own channels over its own batch (so batch
statistics never mix tasks), and its classifier is one slice of a batched matrix product. The network is then
an ordinary differentiable function of per-task parameters ``(T, *shape)``: plain autograd, second order
included, with no batching rules involved (``vmap`` of second-order MAML through BatchNorm gives wrong
meta-gradients, see ``benchmarks/vmap_check.py``), and each layer runs as one kernel for the whole meta-batch.

``task_batched_loss(model)`` is a loss function for :func:`learnedopt.unroll` with one loss per task, so MAML on a
meta-batch is a single unroll of the SGD rule (:func:`baselines.maml.maml_step` with ``batched=True``).
"""

from __future__ import annotations

from typing import Callable, TypeGuard

import torch
from torch import Tensor, nn

from learnedopt.unroll import Params

__all__ = ["task_batched_loss", "supports_task_batching"]


_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear)


def supports_task_batching(model: nn.Module) -> TypeGuard[nn.Sequential]:
    """True for the networks :func:`task_batched_loss` can widen: an image classifier made of Conv-4's layer types
    (convolutions first, on ``(C, H, W)`` inputs)."""
    return (
        isinstance(model, nn.Sequential)
        and len(model) > 0
        and isinstance(model[0], nn.Conv2d)
        and all(isinstance(m, _LAYERS) for m in model)
    )


def task_batched_logits(model: nn.Sequential, params: Params, x: Tensor) -> Tensor:
    """Logits ``(T, B, ways)`` of ``T`` copies of ``model`` with parameters ``params[name]: (T, *shape)`` on
    inputs ``x: (T, B, C, H, W)``."""
    tasks, batch = x.shape[:2]
    h = x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])  # (B, T*C, H, W): task-major channels
    for name, layer in model.named_children():
        if isinstance(layer, nn.Conv2d):
            w = params[f"{name}.weight"]
            b = params[f"{name}.bias"] if layer.bias is not None else None
            h = nn.functional.conv2d(
                h, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
                stride=layer.stride, padding=layer.padding, groups=tasks,  # type: ignore[arg-type]
            )
        elif isinstance(layer, nn.BatchNorm2d):
            h = nn.functional.batch_norm(
                h, None, None, params[f"{name}.weight"].reshape(-1), params[f"{name}.bias"].reshape(-1),
                training=True, eps=layer.eps,
            )
        elif isinstance(layer, nn.Flatten):
            h = h.reshape(batch, tasks, -1).transpose(0, 1)  # (T, B, features of that task)
        elif isinstance(layer, nn.Linear):
            h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))
        else:  # ReLU, MaxPool2d: elementwise or per channel, so per task already
            h = layer(h)
    return h


def task_batched_loss(model: nn.Module) -> Callable[[Params, tuple[Tensor, Tensor]], Tensor]:
    """``loss_fn(params, (x, y)) -> (T,)``: each task's mean cross-entropy, for :func:`learnedopt.unroll`.

    Example:
        >>> from learnedopt_experiments.baselines.models import conv4
        >>> model = conv4(5, channels=8, strided=True)
        >>> params = {k: v.expand(3, *v.shape) for k, v in model.named_parameters()}
        >>> x, y = torch.randn(3, 5, 1, 28, 28), torch.arange(5).repeat(3, 1)
        >>> task_batched_loss(model)(params, (x, y)).shape
        torch.Size([3])
    """
    if not supports_task_batching(model):
        raise TypeError("task batching supports nn.Sequential models of Conv2d/BatchNorm2d/ReLU/MaxPool2d/Flatten/"
                        "Linear layers (Conv-4); use the per-task loop for other models")

    def loss_fn(params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = task_batched_logits(model, params, x)
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return losses.view(y.shape).mean(dim=1)

    return loss_fn
