"""Distributed meta-training: 2 gloo processes on localhost equal one process over the same global task batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learnedopt import MetaTrainConfig, MetaTrainer
from learnedopt_experiments.meta_train.tasks import QuadraticFamily

ROOT = Path(__file__).resolve().parents[1]


def config(iterations: int, estimator: str = "tbptt") -> MetaTrainConfig:
    return MetaTrainConfig(task="quadratic", iterations=iterations, horizon=20, unroll=10, meta_batch=8,
                           eval_every=100, checkpoint_every=1, eval_tasks=8, eval_lengths=(20,), estimator=estimator,
                           es_pairs=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str, runs: list[tuple[int, bool]], estimator: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for iterations, resume in runs:
            trainer = MetaTrainer(QuadraticFamily(), config(iterations, estimator), out, resume=resume, progress=False)
            trainer.train()
        torch.save(trainer.net.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _distributed(tmp_path: Path, runs: list[tuple[int, bool]], estimator: str = "tbptt") -> list[dict]:
    out = tmp_path / "dist"
    mp.spawn(_rank_main, args=(2, _free_port(), str(out), runs, estimator), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _single(tmp_path: Path, iterations: int, estimator: str = "tbptt") -> dict:
    trainer = MetaTrainer(QuadraticFamily(), config(iterations, estimator), tmp_path / "single", progress=False)
    trainer.train()
    return trainer.net.state_dict()


# ES divides loss differences by sigma^2 = 1e-4, so float32 rounding of the task mean (4 + 4 tasks vs 8) can move a
# near-zero meta-gradient entry, which Adam then normalizes into a visible step: compare ES runs more loosely.
@pytest.mark.parametrize("estimator, atol", [("tbptt", 1e-6), ("pes", 1e-3)])
def test_two_ranks_equal_one_process_and_each_other(tmp_path, estimator, atol):
    ranks = _distributed(tmp_path, [(3, False)], estimator)
    single = _single(tmp_path, 3, estimator)
    initial = MetaTrainer(QuadraticFamily(), config(1), tmp_path / "fresh", progress=False).net.state_dict()
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # every rank holds the same weights
        torch.testing.assert_close(ranks[0][key], value, rtol=0, atol=atol)
        assert not torch.equal(value, initial[key])  # training moved them


def test_resumed_distributed_run_continues_on_every_rank(tmp_path):
    ranks = _distributed(tmp_path, [(2, False), (3, True)])
    single = _single(tmp_path, 3)
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, rtol=0, atol=1e-6)


def test_torchrun_launches_meta_train(tmp_path):
    """The documented launch line works end to end (2 CPU processes, gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "learnedopt_cli", "meta-train", "--task", "quadratic", "--out", str(tmp_path / "run"), "--iterations", "2",
               "--horizon", "20", "--unroll", "10", "--meta-batch", "8", "--eval-tasks", "8", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "net.pt").is_file() and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert done.stdout.count("wrote") == 1  # rank 0 alone reports


@pytest.mark.parametrize("family", ["quadratic", "mnist-mlp"])
def test_a_task_shard_is_those_rows_of_the_whole_batch(family):
    """Each rank's block has the same initial parameters, batches and losses as those rows of the global batch."""
    from learnedopt.meta.distributed import TaskShard
    from learnedopt_experiments.meta_train.tasks import get_family

    if family.startswith("mnist") and not (ROOT.parent / "shared" / "data" / "MNIST" / "raw").is_dir():
        pytest.skip("needs ../shared/data/MNIST")
    task = get_family(family).sample(4, torch.Generator().manual_seed(0))
    full_params = task.init_params(torch.Generator().manual_seed(1))
    full_loss = task.loss(full_params, task.batch(3))
    shard = TaskShard(task, slice(2, 4))
    params = shard.init_params(torch.Generator().manual_seed(1))
    assert shard.num_tasks == 2
    for k, v in params.items():
        assert torch.equal(v, full_params[k][2:4])
    torch.testing.assert_close(shard.loss(params, shard.batch(3)), full_loss[2:4])
