"""Data-parallel meta-training over ``torch.distributed``: each rank unrolls its share of every task batch.

Every rank draws the same global task batch from the same generator (drawing is cheap; unrolling is not) and
keeps its contiguous block of ``meta_batch / world`` tasks; meta-gradients
are averaged with ``all_reduce``, so every rank takes the same meta-optimizer step and holds the same weights,
equal (up to float rounding) to one process unrolling the whole batch. Rank 0 alone evaluates, logs and writes
checkpoints; a resumed run reads the checkpoint on every rank.

Launch: ``torchrun --nproc_per_node N -m learnedopt_cli meta-train --task quadratic --out runs/x`` (gloo on CPU, nccl on CUDA);
across machines add ``--nnodes M --node_rank K --rdzv_endpoint HOST:PORT`` (see the README).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .tasks import Params, Task

__all__ = ["init_from_environment", "rank_and_world", "TaskShard", "shard", "all_reduce_mean", "any_rank"]


def init_from_environment(device: str) -> str:
    """Join the process group that ``torchrun`` describes in the environment; returns this process's device.

    A plain ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process). A single process is left as it is.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TaskShard:
    """Tasks ``rows`` of a batched :class:`~learnedopt.meta.tasks.Task`: the same initial parameters and minibatches
    as those rows of the whole batch, so a sharded run computes what a single process would."""

    def __init__(self, task: Task, rows: slice) -> None:
        self.task, self.rows = task, rows
        self.num_tasks = len(range(*rows.indices(task.num_tasks)))
        self.device = task.device

    def init_params(self, generator: torch.Generator) -> Params:
        return {k: v[self.rows] for k, v in self.task.init_params(generator).items()}

    def batch(self, step: int) -> Any:
        return _rows(self.task.batch(step), self.rows)

    def loss(self, params: Params, batch: Any) -> Tensor:
        return self.task.loss(params, batch)


def _rows(batch: Any, rows: slice) -> Any:
    if isinstance(batch, Tensor):
        return batch[rows]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(b, rows) for b in batch)
    if batch is None:
        return None
    raise TypeError(f"cannot shard a batch of type {type(batch).__name__} across ranks")


def shard(task: Task) -> Task:
    """This rank's block of ``task`` (the task itself in a single process)."""
    rank, world = rank_and_world()
    if world == 1:
        return task
    if task.num_tasks % world:
        raise ValueError(f"--meta-batch ({task.num_tasks}) must be a multiple of the number of processes ({world})")
    size = task.num_tasks // world
    return TaskShard(task, slice(rank * size, (rank + 1) * size))


def all_reduce_mean(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` over ranks, in place, in one flat all-reduce."""
    _, world = rank_and_world()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on any (e.g. "out of time"), so all ranks stop together."""
    _, world = rank_and_world()
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_from_lead(tensors: Sequence[Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values (e.g. weights that only rank 0 restored)."""
    if rank_and_world()[1] == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)
