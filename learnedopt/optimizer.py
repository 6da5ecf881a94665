"""Stateful ``torch.optim.Optimizer`` wrappers over pure update rules.

The wrapper owns nothing but bookkeeping: it validates arguments, keeps each parameter's rule state in
``self.state[p]`` (so ``state_dict()`` works as for any torch optimizer) and applies ``param += lr * update``
in place. The math is the rule's, shared with the unroll engine.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import asdict
from typing import Any, Callable, Iterable, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch < 2.5 kept it private; builds without torch.distributed have none
    try:
        from torch.distributed._tensor import DTensor as _DTensor  # type: ignore[no-redef]
    except ImportError:
        _DTensor = None  # type: ignore[assignment,misc]

from .lstm import CoordinatewiseLSTM, LSTMConfig, LSTMRule
from .pretrained import payload_digest
from .rules import UpdateRule, check_lr

__all__ = ["RuleOptimizer", "LearnedOptimizer", "anneal_factor"]


def net_identity(net: CoordinatewiseLSTM) -> dict[str, Any]:
    """The architecture and a SHA-256 digest of the weights of ``net``: what a saved hidden state belongs to."""
    weights = {k: v.to(torch.float32) for k, v in net.state_dict().items()}  # as save_net writes them
    return {"config": asdict(net.config), "digest": payload_digest(weights)}


def _check_weight_decay(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid weight_decay: {value!r} (expected a finite number >= 0)")


ANNEAL_AFTER = 200  # LearnedOptimizer's default, chosen on the drop-in suite's tuning seed (results/anneal.md)


def _check_anneal_after(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Invalid anneal_after: {value!r} (expected an int >= 1, or None to never anneal)")


def anneal_factor(step: int, anneal_after: int | None) -> float:
    """The step-size factor at a parameter's ``step``-th update (1-based): 1 up to ``anneal_after``, then
    ``sqrt(anneal_after / step)``, the classic rate for noise-dominated stochastic approximation."""
    if anneal_after is None or step <= anneal_after:
        return 1.0
    return math.sqrt(anneal_after / step)


def _local(tensor: Tensor) -> Tensor:
    """This process's shard of a ``DTensor`` (FSDP2, tensor parallelism), as a view whose in-place updates change
    the parameter; any other tensor as it is. Coordinatewise rules never need the global tensor, so their state
    is sized, kept and saved per shard."""
    if _DTensor is not None and isinstance(tensor, _DTensor):
        return tensor.to_local()
    return tensor


class RuleOptimizer(Optimizer):
    """Run any :class:`~learnedopt.rules.UpdateRule` as a ``torch.optim.Optimizer``.

    Param-group ``lr`` multiplies the rule's update, so learning-rate schedulers work. Parameters whose
    ``.grad`` is ``None`` are skipped and their state is left untouched.

    ``weight_decay`` (per param group too) is decoupled weight decay as in ``torch.optim.AdamW``: before the
    rule's update, each parameter is multiplied by ``1 - lr * decay_scale * weight_decay``. ``decay_scale`` is the
    rule's nominal step size (e.g. the learning rate of an ``adam(lr)`` rule), so that a weight decay value means
    what it means for AdamW at that step size.

    ``anneal_after`` (per param group too; default ``None``: never) scales a parameter's step, weight decay
    included, by :func:`anneal_factor` of how many steps it has taken (``state[p]["steps_taken"]``), on top of
    ``lr`` and any scheduler.

    Example:
        >>> import torch, learnedopt
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = learnedopt.RuleOptimizer([w], learnedopt.sgd(lr=0.5))
        >>> w.sum().backward(); opt.step(); w.data
        tensor([0.5000, 0.5000])
    """

    _fixed_settings: dict[str, Any] = {}  # optimizer-wide settings shown in defaults; groups may not change them

    def __init__(self, params: Iterable[Any], rule: UpdateRule, lr: float = 1.0, *, weight_decay: float = 0.0,
                 decay_scale: float = 1.0, anneal_after: int | None = None) -> None:
        check_lr(lr)
        _check_weight_decay(weight_decay)
        _check_anneal_after(anneal_after)
        if not (math.isfinite(decay_scale) and decay_scale > 0):
            raise ValueError(f"Invalid decay_scale: {decay_scale!r} (expected a finite number > 0)")
        self.rule, self.decay_scale = rule, decay_scale
        defaults = {"lr": lr, "weight_decay": weight_decay, "anneal_after": anneal_after, **self._fixed_settings}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "lr" in param_group:
            check_lr(param_group["lr"])
        if "weight_decay" in param_group:
            _check_weight_decay(param_group["weight_decay"])
        if "anneal_after" in param_group:
            _check_anneal_after(param_group["anneal_after"])
        for key, value in self._fixed_settings.items():
            if key in param_group and param_group[key] != value:
                raise ValueError(f"{key} is set for the whole optimizer ({value!r}), not per param group")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            name = names[i] if names else f"parameter {i} of param group {len(self.param_groups) - 1}"
            if not p.is_floating_point() or p.is_complex():
                raise TypeError(
                    f"{name} has dtype {p.dtype}: {type(self).__name__} optimizes real floating-point "
                    "parameters only (float32, float64, bfloat16, float16)"
                )
            if p.is_sparse:
                raise TypeError(f"{name} is a sparse tensor: {type(self).__name__} supports dense parameters only")

    def _rule_for(self, device: torch.device) -> UpdateRule:
        """The rule to run for parameters on ``device`` (a subclass may keep one copy per device)."""
        return self.rule

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Take one optimization step; returns ``closure()``'s loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            check_lr(group["lr"])
            by_device: dict[torch.device, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(
                        f"a parameter of shape {tuple(p.shape)} has a sparse gradient: "
                        f"{type(self).__name__} supports dense gradients only"
                    )
                by_device.setdefault(p.device, []).append(p)
            for device, params in by_device.items():
                rule = self._rule_for(device)
                local = [_local(p) for p in params]  # the rule runs on this process's shard of each tensor
                for p, shard in zip(params, local):
                    if not self.state[p]:
                        self.state[p].update(rule.init([shard])[0])
                grads = [_local(cast(Tensor, p.grad)) for p in params]
                # inplace: self.state holds the only reference to the old state, so a rule may overwrite it
                updates, new_state = rule.update(grads, [self.state[p] for p in params], local, inplace=True)
                for p, shard, u, s in zip(params, local, updates, new_state):
                    # a CPU tensor, as torch.optim keeps "step": a tensor like the rest of the state, read without
                    # a device sync; a fresh one each step, since counting in place breaks the graph of
                    # torch.compile(opt.step, fullgraph=True) at the int() (tests/test_optimizer.py)
                    taken = int(self.state[p].get("steps_taken", 0)) + 1
                    lr = float(group["lr"]) * anneal_factor(taken, group.get("anneal_after"))
                    shrink = 1.0 - lr * self.decay_scale * float(group["weight_decay"])
                    if shrink != 1.0:  # decoupled weight decay (AdamW), on the parameter before this step
                        shard.mul_(shrink)
                    shard.add_(u, alpha=lr)
                    self.state[p].update(s)
                    self.state[p]["steps_taken"] = torch.tensor(taken)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state like ``torch.optim``, but keep each state tensor's saved dtype.

        ``torch.optim`` casts floating state to the parameter's dtype; a float32 hidden state kept beside
        bfloat16 parameters would lose bits, and training would not continue bit-identically. The saved tensors
        are taken after every registered load-state-dict pre-hook has run (a last hook of ours records them).
        """
        seen: dict[str, Any] = {}

        def record(optimizer: Optimizer, loaded: dict[str, Any]) -> None:
            seen["state_dict"] = loaded

        handle = self.register_load_state_dict_pre_hook(record)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        loaded = seen.get("state_dict") or state_dict
        saved_ids = [i for group in loaded["param_groups"] for i in group["params"]]
        params = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"])))
        for index, saved in loaded["state"].items():
            if index not in params:
                continue  # torch.optim keeps such entries as they are
            p = params[index]
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    device = "cpu" if key == "steps_taken" else p.device
                    self.state[p][key] = value.detach().to(device=device, copy=True)

    def __getstate__(self) -> dict[str, Any]:
        """``torch.optim`` pickles only defaults, state and groups; the rule is part of this optimizer too."""
        return {**super().__getstate__(), **{k: v for k, v in self.__dict__.items() if k in self._extra_state}}

    _extra_state: tuple[str, ...] = ("rule", "decay_scale", "_fixed_settings")


class LearnedOptimizer(RuleOptimizer):
    """The coordinatewise LSTM optimizer of Andrychowicz et al. (2016) as a drop-in ``torch.optim.Optimizer``.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        net: a packaged net name (see :func:`learnedopt.list_pretrained`), a path to a ``net.pt`` written by
            ``learnedopt meta-train``, or a :class:`~learnedopt.CoordinatewiseLSTM`. ``None`` loads the packaged
            default, with no network access.
        lr: multiplies the net's output (1.0 reproduces the meta-trained behaviour); schedulers may change it.
        weight_decay: decoupled weight decay (AdamW's), also per param group (e.g. 0 for biases and norms, as
            timm's and Hugging Face's grouping do): each step first multiplies a parameter by
            ``1 - lr * output_scale * weight_decay``, ``output_scale`` being the net's nominal step (1e-3 for
            ``general-lstm``), so ``weight_decay=0.05`` decays as ``AdamW(lr=1e-3, weight_decay=0.05)`` does.
        anneal_after: after this many steps of a parameter, its step (and weight decay) shrinks as
            ``sqrt(anneal_after / t)`` at step ``t`` (:func:`anneal_factor`; the inverse-square-root schedule),
            also per param group; ``None`` runs the raw net. Why: the packaged nets were meta-trained on runs of
            100-500 steps, where big steps pay off; run longer, their steps keep that size and the loss stalls
            at a noise floor (10,000 steps of an MNIST MLP: 7.9x tuned Adam's loss raw, 0.88x annealed, on the
            tuning seed). 200 was chosen on the drop-in suite's tuning seed among 100-1000 (results/anneal.md).
            It needs no run length and multiplies any scheduler's ``lr``: with a schedule that already decays,
            or a net meta-trained on much longer runs, pass ``None`` or a larger value.
        state_dtype: dtype of the per-coordinate hidden state (default: the net's, float32).
        chunk_size: coordinates per LSTM call; all parameters of a group form one flat batch that is cut into
            chunks of this many rows (``benchmarks/step.py --chunk-size`` measures the best one for a device).
        compile: run the torch ops through :func:`torch.compile` (fused gate math; results equal within float
            rounding; the first steps pay the compilation). Where the C kernel runs (``backend``), it takes
            precedence.
        backend: where the step's math runs (:data:`learnedopt.lstm.BACKENDS`). ``"auto"`` (default): one C
            kernel call per tensor (features, LSTM, head and update in one pass over the state), compiled for
            this CPU at first use and cached (:mod:`learnedopt._kernel`), wherever it applies (CPU parameters, a
            float32 net) and a C compiler exists; torch ops otherwise. ``"kernel"``: require the kernel (an
            error says why it cannot run). ``"torch"``: torch ops only. All give the same results within float
            rounding.

    The default net (``general-lstm``, ``output="adam"`` in its :class:`~learnedopt.LSTMConfig`) is safe by
    construction, whatever its weights (NaN included): each coordinate moves by at most ``lr * output_scale *
    (magnitude_range + 1)`` per step (1e-3 * 101 for ``general-lstm`` at ``lr=1``), and a coordinate whose
    gradient has always been exactly zero does not move. The paper-faithful nets (``mnist-lstm``,
    ``quadratic-lstm``) have an unbounded linear output.

    Per-parameter hidden state lives in ``self.state[p]`` (``"h"``, ``"c"``, ``"nonfinite"``, and the running
    moments ``"m"``, ``"v"``, ``"step"`` for nets that use them), so ``state_dict()`` / ``load_state_dict()``
    round-trip exactly. A NaN or infinite gradient coordinate, or one whose square would overflow
    (:func:`~learnedopt.lstm.largest_gradient`), gets a zero update and keeps its state;
    ``state[p]["nonfinite"]`` counts such coordinate-steps. A ``DTensor`` parameter (FSDP2) is stepped on its
    local shard, with state per shard.

    Example:
        >>> import torch, learnedopt
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = learnedopt.LearnedOptimizer(model.parameters())
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     opt.step()
    """

    rule: LSTMRule

    def __init__(
        self,
        params: Iterable[Any],
        net: str | os.PathLike[str] | CoordinatewiseLSTM | None = None,
        lr: float = 1.0,
        *,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype | None = None,
        chunk_size: int = 16384,
        compile: bool = False,
        backend: str = "auto",
        anneal_after: int | None = ANNEAL_AFTER,
    ) -> None:
        from .pretrained import DEFAULT_NET, load_net

        if net is None:
            net = DEFAULT_NET
        net_name = "custom"
        if not isinstance(net, CoordinatewiseLSTM):
            if not isinstance(net, (str, os.PathLike)):
                raise TypeError(
                    f"net must be a packaged name, a path or a CoordinatewiseLSTM, got {type(net).__name__}"
                )
            net_name = os.fspath(net)
            net = load_net(net)
        if state_dtype is not None and not state_dtype.is_floating_point:
            raise TypeError(f"state_dtype must be a floating-point dtype, got {state_dtype}")
        self.net = net
        self._fixed_settings = {
            "net": net_name, "state_dtype": state_dtype, "chunk_size": chunk_size, "compile": compile, "backend": backend,
        }
        rule = LSTMRule(net, state_dtype, chunk_size, compile, backend)
        self._rules: dict[torch.device, LSTMRule] = {net.head.weight.device: rule}
        super().__init__(params, rule, lr, weight_decay=weight_decay, decay_scale=net.config.output_scale,
                         anneal_after=anneal_after)

    _extra_state = ("rule", "decay_scale", "net", "_rules", "_fixed_settings")

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict plus the identity of the net that made the hidden state (``"net"``)."""
        return {**super().state_dict(), "net": net_identity(self.net)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse hidden state from a net of another shape; warn when it comes from other weights of this shape."""
        saved = state_dict.get("net")
        if saved is not None:
            ours = net_identity(self.net)
            shape = ("hidden_size", "num_layers", "inputs", "output", "momentum_decays")
            saved_config = LSTMConfig.from_dict(saved["config"])
            if any(getattr(saved_config, k) != getattr(self.net.config, k) for k in shape):
                raise ValueError(
                    f"this optimizer state was made by a net of another architecture ({saved['config']}); this "
                    f"optimizer's net is {ours['config']}: build the optimizer with the net that made the state"
                )
            if saved["digest"] != ours["digest"]:
                warnings.warn(
                    "this optimizer state was made by a different net of the same shape (weights digest "
                    f"{saved['digest'][:12]} vs {ours['digest'][:12]}); the hidden state will mean something else",
                    stacklevel=2,
                )
        super().load_state_dict(state_dict)

    def _rule_for(self, device: torch.device) -> LSTMRule:
        """The rule whose net lives on ``device``: the net is copied once per device it is needed on."""
        if device not in self._rules:
            net = copy.deepcopy(self.net).to(device)
            rule = self.rule
            self._rules[device] = LSTMRule(net, rule.state_dtype, rule.chunk_size, rule.compile, rule.backend)
        return self._rules[device]
