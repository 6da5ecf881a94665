"""Tasks are data: a batch of optimization problems with one functional loss, sampled from a family.

A :class:`Task` holds ``num_tasks`` problems at once (a leading task dimension on every parameter), so the
coordinatewise optimizer sees all of them as one batch of coordinates, and the loss returns one value per problem:
each problem's gradient is its own, unscaled. :class:`ModuleFamily` builds such tasks from what a PyTorch user
already has (a model, data, a loss); :class:`Mixture` and :class:`RescaledTask` combine and perturb families.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from ..unroll import Params
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state, vmap
from torch.utils.data import DataLoader, Dataset, TensorDataset


__all__ = ["Params", "Task", "TaskFamily", "ModuleTask", "ModuleFamily", "Mixture", "RescaledTask"]


class Task(Protocol):
    """A batch of ``num_tasks`` problems: initial parameters, a loss and a deterministic batch for every step."""

    num_tasks: int
    device: torch.device

    def init_params(self, generator: torch.Generator) -> Params:
        """Sample initial parameters (each with a leading dimension of ``num_tasks``)."""
        ...

    def loss(self, params: Params, batch: Any) -> Tensor:
        """Return the ``(num_tasks,)`` losses of ``params`` on ``batch``."""
        ...

    def batch(self, step: int) -> Any:
        """The batch used at optimization step ``step``; the same for every optimizer evaluated on this task."""
        ...


@runtime_checkable
class TaskFamily(Protocol):
    """A distribution over tasks, with the batch sizes that suit it."""

    name: str
    default_meta_batch: int
    default_eval_tasks: int

    def sample(self, num_tasks: int, generator: torch.Generator) -> Task:
        """Draw ``num_tasks`` problems as one batched :class:`Task`."""
        ...

    def components(self) -> Sequence["TaskFamily"]:
        """The families scored separately on held-out tasks: ``[self]``, or a mixture's members."""
        ...


ModelSource = Callable[[], nn.Module] | nn.Module
DataSource = Dataset | tuple[Tensor, Tensor]


class ModuleFamily:
    """Tasks from your own model, data and loss: each task is a fresh initialization and minibatch order.

    ``model`` is a factory (called once per task, under that task's seed) or an ``nn.Module`` (copied, then
    re-initialized with each submodule's ``reset_parameters``); ``init(module)``, if given, runs after either.
    Every trainable floating-point parameter is optimized; frozen ones and buffers keep the values of one
    reference copy, and BatchNorm layers normalize with batch statistics (running statistics are not updated).
    ``data`` is ``(inputs, targets)`` tensors, a ``TensorDataset`` or any map-style ``Dataset`` of
    ``(input, target)`` pairs; it is gathered into tensors on ``device`` once, so a step indexes a minibatch
    instead of running a ``DataLoader``. ``loss_fn(outputs, targets)`` returns the mean loss of a minibatch.

    A task's copies run as one call under ``torch.func.vmap`` (``batched=None`` tries it and falls back to a
    Python loop over copies when the model cannot be vmapped; ``batched=False`` forces the loop, which can be the
    faster one for some models: results/performance.md measures both). The final
    parameters are scored on a fixed subset of ``eval_examples`` examples, the same for every optimizer.

    Example:
        >>> import torch, learnedopt
        >>> x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
        >>> family = learnedopt.ModuleFamily(lambda: torch.nn.Linear(8, 3), (x, y),
        ...                                  torch.nn.functional.cross_entropy, batch_size=32, name="linear")
        >>> task = family.sample(4, torch.Generator().manual_seed(0))
        >>> params = task.init_params(torch.Generator().manual_seed(1))
        >>> params["weight"].shape, task.loss(params, task.batch(0)).shape
        (torch.Size([4, 3, 8]), torch.Size([4]))
    """

    task_type: type["ModuleTask"]  # what sample() builds (a subclass may add metrics, e.g. test accuracy)

    def __init__(
        self,
        model: ModelSource,
        data: DataSource,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        batch_size: int = 128,
        *,
        name: str = "module",
        init: Callable[[nn.Module], None] | None = None,
        eval_examples: int = 10_000,
        device: str | torch.device = "cpu",
        batched: bool | None = None,
        default_meta_batch: int = 8,
        default_eval_tasks: int = 8,
    ) -> None:
        if batch_size < 1 or eval_examples < 1:
            raise ValueError(f"batch_size and eval_examples must be >= 1, got {batch_size} and {eval_examples}")
        self.name, self.batch_size, self.eval_examples = name, batch_size, eval_examples
        self.default_meta_batch, self.default_eval_tasks = default_meta_batch, default_eval_tasks
        self.device = torch.device(device)
        self.loss_fn, self._init = loss_fn, init
        self._source = model
        self.inputs, self.targets = (t.to(self.device) for t in _as_tensors(data))
        self.template = self.build(seed=0).to(self.device)
        replace_all_batch_norm_modules_(self.template)
        self.names = [n for n, p in self.template.named_parameters() if p.requires_grad and p.is_floating_point()]
        if not self.names:
            raise ValueError(
                f"the model ({type(self.template).__name__}) has no trainable floating-point parameters: "
                "there is nothing for an optimizer to learn on"
            )
        self.batched = self._vmap_works() if batched is None else batched
        self._check_loss()

    def build(self, seed: int) -> nn.Module:
        """A freshly initialized model, a pure function of ``seed`` (the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if isinstance(self._source, nn.Module):
                module = copy.deepcopy(self._source)
                for sub in module.modules():
                    reset = getattr(sub, "reset_parameters", None)
                    if callable(reset):
                        reset()
            elif callable(self._source):
                module = self._source()
                if not isinstance(module, nn.Module):
                    raise TypeError(f"the model factory returned {type(module).__name__}, not an nn.Module")
            else:
                raise TypeError(f"model must be an nn.Module or a function returning one, got {type(self._source)}")
            if self._init is not None:
                self._init(module)
        return module

    def sample(self, num_tasks: int, generator: torch.Generator) -> "ModuleTask":
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        return self.task_type(self, num_tasks, seed)

    def components(self) -> list["ModuleFamily"]:
        return [self]

    def forward(self, params: Params, inputs: Tensor) -> Tensor:
        """Outputs of each copy on its own inputs: ``params`` and ``inputs`` have a leading task dimension."""
        if self.batched:
            return vmap(self._one_forward)(params, inputs)
        return torch.stack([self._one_forward({k: v[i] for k, v in params.items()}, x) for i, x in enumerate(inputs)])

    def losses(self, params: Params, inputs: Tensor, targets: Tensor) -> Tensor:
        """Each copy's mean loss on its own minibatch, ``(num_tasks,)``."""
        if self.batched:
            return vmap(self._one_loss)(params, inputs, targets)
        return torch.stack(
            [self._one_loss({k: v[i] for k, v in params.items()}, x, y) for i, (x, y) in enumerate(zip(inputs, targets))]
        )

    def _one_forward(self, params: Params, inputs: Tensor) -> Tensor:
        return functional_call(self.template, params, (inputs,))

    def _one_loss(self, params: Params, inputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(self._one_forward(params, inputs), targets)

    def _probe(self) -> tuple[Params, Tensor, Tensor]:
        """Two copies of the reference parameters and two examples each: enough to try the model and loss."""
        params = {n: p.detach().expand(2, *p.shape) for n, p in self.template.named_parameters() if n in self.names}
        return params, self.inputs[:2].expand(2, *self.inputs[:2].shape), self.targets[:2].expand(2, *self.targets[:2].shape)

    def _vmap_works(self) -> bool:
        params, inputs, targets = self._probe()
        try:
            vmap(self._one_loss)(params, inputs, targets)
        except Exception:  # data-dependent control flow, in-place buffer updates, ops without a batching rule
            return False
        return True

    def _check_loss(self) -> None:
        params, inputs, targets = self._probe()
        losses = self.losses(params, inputs, targets)
        if losses.shape != (2,) or not losses.is_floating_point():
            raise ValueError(
                f"loss_fn must return one floating-point number per minibatch (its mean loss); got a tensor of shape "
                f"{tuple(losses.shape[1:])} per copy: reduce it, e.g. with reduction='mean'"
            )


class ModuleTask:
    """``num_tasks`` copies of a :class:`ModuleFamily`'s model, each with its own initialization and minibatches."""

    def __init__(self, family: ModuleFamily, num_tasks: int, batch_seed: int) -> None:
        self.family, self.num_tasks, self.batch_seed = family, num_tasks, batch_seed
        self.device = family.device

    def init_params(self, generator: torch.Generator) -> Params:
        seeds = torch.randint(0, 2**62, (self.num_tasks,), generator=generator).tolist()
        models = [self.family.build(seed) for seed in seeds]
        params, _ = stack_module_state(models)  # type: ignore[arg-type]
        return {k: params[k].detach().to(self.device) for k in self.family.names}

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Each copy's minibatch at ``step``: a pure function of the task's seed and the step."""
        family = self.family
        g = torch.Generator().manual_seed(self.batch_seed * 1_000_003 + step)
        index = torch.randint(0, len(family.targets), (self.num_tasks, family.batch_size), generator=g)
        index = index.to(self.device)
        return family.inputs[index], family.targets[index]

    def loss(self, params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self.family.losses(params, *batch)

    @torch.no_grad()
    def eval_loss(self, params: Params, chunk: int = 2500) -> Tensor:
        """Each copy's mean loss on the family's fixed evaluation subset, ``(num_tasks,)``.

        Scores the final parameters on the same data for every optimizer: the loss of one last minibatch is
        noisy enough to reorder optimizers.
        """
        family = self.family
        params = {k: v.detach() for k, v in params.items()}
        fixed = _eval_subset(len(family.targets), family.eval_examples).to(self.device)
        total = torch.zeros(self.num_tasks, device=self.device)
        for start in range(0, len(fixed), chunk):
            index = fixed[start : start + chunk]
            shape = (self.num_tasks, len(index))
            inputs = family.inputs[index].expand(*shape[:1], *family.inputs[index].shape)
            targets = family.targets[index].expand(*shape[:1], *family.targets[index].shape)
            total += family.losses(params, inputs, targets) * len(index)
        return total.cpu() / len(fixed)


ModuleFamily.task_type = ModuleTask


@lru_cache(maxsize=8)
def _eval_subset(size: int, examples: int) -> Tensor:
    """The fixed evaluation subset of the data (the same for every task, optimizer and run)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(0))[:examples]


def _as_tensors(data: DataSource) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` as two tensors of equal length, gathered once from whatever the user has."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
            raise TypeError("data as a tuple must be (inputs, targets): two tensors")
        inputs, targets = data
    elif isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise TypeError(f"a TensorDataset for ModuleFamily holds (inputs, targets), not {len(data.tensors)} tensors")
        inputs, targets = data.tensors
    elif isinstance(data, Dataset):
        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("the dataset is empty")
        batches = list(DataLoader(data, batch_size=1024))
        if not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
            raise TypeError("the dataset's items must be (input, target) pairs")
        inputs = torch.cat([torch.as_tensor(b[0]) for b in batches])
        targets = torch.cat([torch.as_tensor(b[1]) for b in batches])
    else:
        raise TypeError(f"data must be (inputs, targets) tensors or a torch Dataset, got {type(data).__name__}")
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(f"inputs and targets need the same, nonzero length; got {len(inputs)} and {len(targets)}")
    return inputs, targets


class Mixture:
    """Each sampled task batch comes from one member family, drawn uniformly; members are scored separately.

    Example:
        >>> import torch
        >>> from learnedopt import ModuleFamily
        >>> data = (torch.randn(64, 4), torch.randn(64, 1))
        >>> small = ModuleFamily(lambda: torch.nn.Linear(4, 1), data, torch.nn.functional.mse_loss, 16, name="a")
        >>> deep = ModuleFamily(lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)), data,
        ...                     torch.nn.functional.mse_loss, 16, name="b")
        >>> mix = Mixture([small, deep], name="both")
        >>> [f.name for f in mix.components()], mix.sample(2, torch.Generator().manual_seed(0)).num_tasks
        (['a', 'b'], 2)
    """

    def __init__(self, families: Sequence[TaskFamily], name: str) -> None:
        if not families:
            raise ValueError("a mixture needs at least one family")
        self.name = name
        self.families = list(families)
        self.default_meta_batch = min(f.default_meta_batch for f in self.families)
        self.default_eval_tasks = min(f.default_eval_tasks for f in self.families)

    def components(self) -> list[TaskFamily]:
        return self.families

    def sample(self, num_tasks: int, generator: torch.Generator) -> Task:
        pick = int(torch.randint(0, len(self.families), (1,), generator=generator))
        return self.families[pick].sample(num_tasks, generator)


class RescaledTask:
    """Random objective rescaling (Lv et al. 2017): optimize ``f(c * theta)`` from ``theta_0 / c``.

    ``c = exp(U(-log_range, log_range))`` is drawn per coordinate when the initial parameters are drawn, so a rule
    cannot rely on the absolute scale of gradients or parameters; the loss values are those of the original task.
    """

    def __init__(self, task: Task, log_range: float) -> None:
        self.task, self.log_range = task, log_range
        self.num_tasks, self.device = task.num_tasks, task.device
        self.scales: Params = {}

    def init_params(self, generator: torch.Generator) -> Params:
        params = self.task.init_params(generator)
        self.scales = {
            k: torch.exp((2 * torch.rand(v.shape, generator=generator) - 1) * self.log_range).to(v)
            for k, v in params.items()
        }
        return {k: v / self.scales[k] for k, v in params.items()}

    def loss(self, params: Params, batch: Any) -> Tensor:
        return self.task.loss({k: v * self.scales[k] for k, v in params.items()}, batch)

    def batch(self, step: int) -> Any:
        return self.task.batch(step)
