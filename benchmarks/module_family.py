"""ModuleFamily: one meta-training truncation with the task copies under vmap vs a Python loop over copies.

Decides ``ModuleFamily``'s default (vmap whenever the model allows it). One truncation = ``--unroll`` steps of
``LSTMRule`` on ``--tasks`` copies plus the meta-gradient's backward pass, on random data of MNIST's shape.

    python benchmarks/module_family.py --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from learnedopt import CoordinatewiseLSTM, LSTMRule, ModuleFamily, unroll

MODELS = {
    "linear (7.9k)": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
    "MLP 784-20-10 (15.9k)": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 20), nn.Sigmoid(), nn.Linear(20, 10)),
    "LeNet CNN (8.2k)": lambda: nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 12, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(300, 10),
    ),
    "strided CNN (mnist-conv, 9.1k)": lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(784, 10),
    ),
}


def truncation_seconds(family: ModuleFamily, tasks: int, steps: int, repeats: int) -> float:
    net = CoordinatewiseLSTM(inputs="normalized", output="adam", output_scale=1e-3)
    task = family.sample(tasks, torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats + 1):  # the first run warms up allocators and vmap's caches
        params = task.init_params(torch.Generator().manual_seed(1))
        started = time.perf_counter()
        out = unroll(task.loss, params, LSTMRule(net), None, steps, task.batch)
        out.meta_loss.backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--unroll", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = (torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,)))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.tasks} tasks x {args.unroll} steps, batch 128, forward + meta-backward")
    print("| model | vmap (s) | loop (s) | loop / vmap |\n|---|---|---|---|")
    for name, make in MODELS.items():
        seconds = {
            batched: truncation_seconds(
                ModuleFamily(make, data, nn.functional.cross_entropy, 128, batched=batched), args.tasks, args.unroll,
                args.repeats,
            )
            for batched in (True, False)
        }
        print(f"| {name} | {seconds[True]:.3f} | {seconds[False]:.3f} | {seconds[False] / seconds[True]:.2f} |")


if __name__ == "__main__":
    main()
