"""LearnedOptimizer under FSDP2, FSDP1, DDP and ZeroRedundancyOptimizer on 2 gloo CPU processes, on the meta
device, and with state that does not fit (issue 17, item 4)."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learnedopt import LearnedOptimizer

STEPS, BATCH = 6, 16
WRAPPERS = ["fsdp2", "fsdp2-torch-ops", "fsdp1", "ddp", "zero"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # odd sizes: FSDP2 shards 7 rows as 4 + 3, FSDP1 pads its flat parameter
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, generator=generator), torch.randn(BATCH, 1, generator=generator))
            for _ in range(STEPS)]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, rows: slice) -> None:
    for x, y in _data():  # each rank its half of every batch; the wrappers average gradients over ranks
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        results = {}
        for wrapper in WRAPPERS:
            model = _model()
            if wrapper.startswith("fsdp2"):
                from torch.distributed.fsdp import fully_shard

                for layer in model:
                    if isinstance(layer, torch.nn.Linear):
                        fully_shard(layer)
                fully_shard(model)
                opt = LearnedOptimizer(model.parameters(), backend="auto" if wrapper == "fsdp2" else "torch")
                _train(model, opt, half)
                results[wrapper] = {k: v.full_tensor() for k, v in model.state_dict().items()}
                state = opt.state[next(iter(model.parameters()))]
                assert state["h"].shape[1] == next(iter(model.parameters())).to_local().numel()  # per shard
            elif wrapper == "fsdp1":
                from torch.distributed.fsdp import FullyShardedDataParallel

                wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
                _train(wrapped, LearnedOptimizer(wrapped.parameters()), half)
                with FullyShardedDataParallel.summon_full_params(wrapped):
                    results[wrapper] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif wrapper == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(model)
                _train(wrapped, LearnedOptimizer(wrapped.parameters()), half)
                results[wrapper] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                from torch.distributed.optim import ZeroRedundancyOptimizer

                wrapped = torch.nn.parallel.DistributedDataParallel(model)
                opt = ZeroRedundancyOptimizer(wrapped.parameters(), optimizer_class=LearnedOptimizer, lr=1.0)
                _train(wrapped, opt, half)
                results[wrapper] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The work is done and saved. Skip the interpreter's teardown: after some orderings of earlier test files in the
    # parent, a child intermittently aborts there with no Python frame ("terminate called without an active
    # exception", std::thread destructors at exit; seen before this test's optimizer changed), failing the spawn.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_sharded_and_replicated_training_equals_one_process(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model = _model()
    _train(model, LearnedOptimizer(model.parameters()), slice(None))
    start = _model().state_dict()
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for wrapper in WRAPPERS:
            for key, value in model.state_dict().items():
                torch.testing.assert_close(results[wrapper][key], value, rtol=0, atol=1e-6,
                                           msg=f"{wrapper} rank {rank} {key}")
    assert all(not torch.equal(start[k], v) for k, v in model.state_dict().items())  # it trained


def test_parameters_on_the_meta_device_step_as_with_torch_adam():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = LearnedOptimizer(model.parameters())
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    assert all(p.is_meta for p in model.parameters())
    assert opt.state[model.weight]["h"].is_meta and opt.state[model.weight]["h"].shape[1] == 12


def test_state_that_does_not_fit_its_parameter_is_an_error_not_a_crash():
    big, small = torch.nn.Parameter(torch.zeros(100)), torch.nn.Parameter(torch.zeros(10))
    source = LearnedOptimizer([big])
    big.grad = torch.ones(100)
    source.step()
    target = LearnedOptimizer([small])
    target.load_state_dict(source.state_dict())
    small.grad = torch.ones(10)
    with pytest.raises(ValueError, match="another model or another sharding"):
        target.step()
