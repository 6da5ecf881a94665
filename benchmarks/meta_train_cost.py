"""Cost of meta-training: a batched meta-batch against a Python loop over tasks, and the memory of a truncation.

    python benchmarks/meta_train_cost.py [--threads 1] [--repeats 3]

Part 1 times one truncation (forward unroll + backward into the LSTM's weights) for a whole meta-batch: as one
batched unroll (what ``meta_train`` runs: every task's coordinates in one LSTM batch, the optimizee batched with
``vmap``) and as a loop of single-task unrolls whose meta-losses are averaged (the straightforward way), for
the quadratic and the MNIST MLP families. Part 2 measures the peak resident memory (Linux VmHWM, reset
before the run) that one truncation adds,
for unrolls of 10, 20 and 50 steps, storing every step or recomputing segments in backward (gradient
checkpointing); each configuration runs in a fresh process so the peaks do not mix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from learnedopt import CoordinatewiseLSTM, LSTMRule, unroll
from meta_train.tasks import get_family


def _truncation(family: str, tasks: int, steps: int, loop: bool, checkpoint: int = 0) -> float:
    """Seconds for one truncation's forward and backward over ``tasks`` tasks."""
    torch.manual_seed(0)
    net = CoordinatewiseLSTM()
    rule = LSTMRule(net)
    task = get_family(family).sample(tasks, torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(1))
    start = time.perf_counter()
    if loop:
        from learnedopt.distributed import TaskShard

        for i in range(tasks):
            one = TaskShard(task, slice(i, i + 1))
            out = unroll(one.loss, {k: v[i : i + 1] for k, v in params.items()}, rule, None, steps, one.batch,
                         transform=torch.log)
            (out.meta_loss / tasks).backward()
    else:
        out = unroll(task.loss, params, rule, None, steps, task.batch, transform=torch.log, checkpoint=checkpoint)
        out.meta_loss.backward()
    return time.perf_counter() - start


def _child(args: argparse.Namespace) -> None:
    """Run one truncation and print the seconds and the peak resident memory it added, as JSON."""
    torch.set_num_threads(args.threads)
    _truncation(args.family, args.tasks, 2, False)  # warm-up: data, allocator, vmap
    Path("/proc/self/clear_refs").write_text("5")  # reset the kernel's peak-RSS mark (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    seconds = _truncation(args.family, args.tasks, args.steps, False, args.checkpoint)
    print(json.dumps({"seconds": seconds, "peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def _status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status: this benchmark's memory part needs Linux")


def _memory_row(args: argparse.Namespace, steps: int, checkpoint: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", "--family", args.memory_family, "--tasks", str(args.memory_tasks),
               "--steps", str(steps), "--checkpoint", str(checkpoint), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-family", default="mnist-mlp")
    parser.add_argument("--memory-tasks", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family", default="mnist-mlp", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} torch={torch.__version__}\n")
    print("| family | tasks | unroll | loop over tasks: s/truncation | batched: s/truncation | speed-up |")
    print("|---|---|---|---|---|---|")
    for family, tasks in (("quadratic", 128), ("mnist-mlp", 8)):
        _truncation(family, tasks, 2, False)
        times = {}
        for loop in (True, False):
            times[loop] = statistics.median(_truncation(family, tasks, 20, loop) for _ in range(args.repeats))
        print(f"| {family} | {tasks} | 20 | {times[True]:.3f} | {times[False]:.3f} | {times[True] / times[False]:.1f}x |",
              flush=True)
    print(f"\nPeak memory added by one truncation ({args.memory_family}, {args.memory_tasks} tasks, forward + backward)\n")
    print("| unroll | stored: peak MB | stored: s | checkpoint 1: peak MB | checkpoint 1: s | saved "
          "| checkpoint 5: peak MB | checkpoint 5: s | saved |")
    print("|---" * 9 + "|")
    for steps in (10, 20, 50):
        stored = _memory_row(args, steps, 0)
        cells = [f"{stored['peak_mb']:.0f}", f"{stored['seconds']:.2f}"]
        for segment in (1, 5):
            row = _memory_row(args, steps, segment)
            cells += [f"{row['peak_mb']:.0f}", f"{row['seconds']:.2f}", f"{1 - row['peak_mb'] / stored['peak_mb']:.0%}"]
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
