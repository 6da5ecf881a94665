"""Cost of meta-training: a truncation against its floor, trainer throughput, batching over tasks, and memory.

    python benchmarks/meta_train_cost.py [--threads 1] [--repeats 3] [--parts floor trainer batching memory]

Part 0 (``floor``) times one bare truncation of the paper's MNIST MLP (one task, 15,910 coordinates, batch 128,
20 steps, forward through ``unroll`` with ``LSTMRule`` + ``meta_loss.backward()``) with the LSTM cells'
op-by-op autograd record (the reference) and with their fused backward, against a floor measured in the same
run: 3x the LSTM's matmul FLOPs per coordinate-step at the gate-matmul GEMM rate, plus its 200 sigmoid/tanh per
coordinate-step at the measured ``sigmoid`` rate (the cell computes tanh through sigmoid). Part 3 (``trainer``) runs ``MetaTrainer.meta_step`` on
``mnist-mlp`` at meta-batch 8 (horizon = unroll = 20) both ways and reports task-truncations per second.

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
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from learnedopt import CoordinatewiseLSTM, LSTMConfig, LSTMRule, MetaTrainConfig, MetaTrainer, unroll
from learnedopt_experiments.meta_train.tasks import get_family
from step import ARCHS, median_time, elementwise_rate, gemm_rate, transcendentals_per_coordinate


class WholeStepCompiled(LSTMRule):
    """The alternative to the fused cell: the whole differentiable net step through ``torch.compile`` (AOTAutograd
    derives and fuses the backward), for the comparison in part 0."""

    compiled: dict[int, Any] = {}

    def _step_function(self, rows: int) -> Any:
        if not torch.is_grad_enabled():
            return super()._step_function(rows)
        if id(self.net) not in self.compiled:
            self.compiled[id(self.net)] = torch.compile(partial(self.net.step, backend="reference"), dynamic=True)
        return self.compiled[id(self.net)]


def _truncation(
    family: str, tasks: int, steps: int, loop: bool, checkpoint: int = 0, backend: str = "auto",
    arch: str = "paper", net: CoordinatewiseLSTM | None = None, device: str = "cpu",
) -> float:
    """Seconds for one truncation's forward and backward over ``tasks`` tasks on ``backend`` (or ``"compiled"``:
    the whole step compiled)."""
    torch.manual_seed(0)
    net = (net or ARCHS[arch]()).to(device)
    if backend == "compiled":
        rule: LSTMRule = WholeStepCompiled(net)
    else:
        rule = LSTMRule(net, backend=backend)
    task = get_family(family, device=device).sample(tasks, torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(1))
    _sync(device)
    start = time.perf_counter()
    if loop:
        from learnedopt.meta.distributed import TaskShard

        for i in range(tasks):
            one = TaskShard(task, slice(i, i + 1))
            out = unroll(one.loss, {k: v[i : i + 1] for k, v in params.items()}, rule, None, steps, one.batch,
                         transform=torch.log)
            (out.meta_loss / tasks).backward()
    else:
        out = unroll(task.loss, params, rule, None, steps, task.batch, transform=torch.log, checkpoint=checkpoint)
        out.meta_loss.backward()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_flops_per_coordinate(net: CoordinatewiseLSTM) -> int:
    """FLOPs of the matmuls of one coordinate's forward step: each layer's ``[x, h, 1] @ W`` and the head."""
    hidden, width, total = net.config.hidden_size, net.config.input_size, 0
    for _ in range(net.config.num_layers):
        total += 2 * (width + hidden + 1) * 4 * hidden
        width = hidden
    return total + 2 * hidden * net.head.out_features


def floor_table(args: argparse.Namespace) -> None:
    """One bare single-task MNIST-MLP truncation, reference and fused backward, against its floor."""
    print("| net | coordinates x steps | floor | reference (op-by-op backward) | ratio | fused cell, torch ops "
          "| ratio | fused cell, C kernel | ratio | speed-up over reference | whole step compiled | ratio |\n"
          + "|---" * 12 + "|")
    coordinates, steps = 15_910, 20
    for arch in ("paper", "general"):
        net = ARCHS[arch]()
        rate = gemm_rate(net, coordinates, args.device)
        sigmoid_rate = elementwise_rate(coordinates, net.config.hidden_size, args.device)
        per_step = 3 * matmul_flops_per_coordinate(net) / rate + transcendentals_per_coordinate(net) / sigmoid_rate
        floor = coordinates * steps * per_step
        variants = ("reference", "torch", "auto", "compiled")
        times: dict[str, list[float]] = {v: [] for v in variants}
        for variant in variants:  # warm-up, and compilation
            _truncation("mnist-mlp", 1, 2, False, backend=variant, net=net, device=args.device)
        for _ in range(args.repeats):
            for variant in variants:  # interleaved, so that a busy neighbour slows all alike
                times[variant].append(_truncation("mnist-mlp", 1, steps, False, backend=variant, net=net,
                                                  device=args.device))
        ref, ops, fused, whole = (statistics.median(times[v]) for v in variants)
        print(f"| {arch} | {coordinates:,} x {steps} | {floor:.3f} s | {ref:.3f} s | {ref / floor:.2f}x | {ops:.3f} s "
              f"| {ops / floor:.2f}x | {fused:.3f} s | {fused / floor:.2f}x | {ref / fused:.2f}x | {whole:.3f} s "
              f"| {whole / floor:.2f}x |", flush=True)
    print(f"\n(gate-matmul GEMM rate {rate / 1e9:.1f} GFLOP/s, sigmoid {sigmoid_rate / 1e9:.2f} G/s, measured in this run)")
    backward_gemm_layouts(coordinates, args.device)


def backward_gemm_layouts(rows: int, device: str) -> None:
    """The fused backward's two products for the second layer's shapes, written directly and as (small x N)
    results transposed back (what ``_FusedCell.backward`` does)."""
    inputs, weight = torch.randn(rows, 41, device=device), torch.randn(80, 41, device=device)
    grad_gates = torch.randn(rows, 80, device=device)
    forms = {
        "weight gradient": (lambda: torch.mm(grad_gates.t(), inputs), lambda: torch.mm(inputs.t(), grad_gates).t()),
        "input gradient": (lambda: torch.mm(grad_gates, weight), lambda: torch.mm(weight.t(), grad_gates.t()).t()),
    }
    for name, (direct, transposed) in forms.items():
        times = [median_time(form, 20, device) for form in (direct, transposed)]
        print(f"backward {name}, {rows} x 41 x 80: direct {1e3 * times[0]:.2f} ms, as (small x N) transposed "
              f"{1e3 * times[1]:.2f} ms ({times[0] / times[1]:.2f}x)")


def trainer_table(args: argparse.Namespace) -> None:
    """Task-truncations per second of ``MetaTrainer.meta_step`` on mnist-mlp at meta-batch 8, both backwards."""
    print("| net | reference: task-truncations/s | fused: task-truncations/s | speed-up |\n|---|---|---|---|")
    family = get_family("mnist-mlp", device=args.device)
    for arch in ("paper", "general"):
        inputs, output = ("paper", "linear") if arch == "paper" else ("normalized", "adam")
        trainers = {
            backend: MetaTrainer(family, MetaTrainConfig(
                iterations=1, horizon=20, unroll=20, meta_batch=8, net=LSTMConfig(inputs=inputs, output=output),
                device=args.device, backend=backend), f"/tmp/learnedopt-meta-train-cost-{backend}", progress=False)
            for backend in ("reference", "auto")
        }
        times: dict[str, list[float]] = {backend: [] for backend in trainers}
        for trainer in trainers.values():
            trainer.meta_step()  # warm-up
        for _ in range(args.repeats):
            for backend, trainer in trainers.items():
                started = time.perf_counter()
                trainer.meta_step()  # ends with .item(): synchronized
                times[backend].append(time.perf_counter() - started)
        ref, fused = (8 / statistics.median(times[b]) for b in trainers)
        print(f"| {arch} | {ref:.2f} | {fused:.2f} | {fused / ref:.2f}x |", flush=True)
    profile = cProfile.Profile()
    profile.runcall(trainer.meta_step)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = next(v[3] for k, v in stats.items() if k[2] == "meta_step")
    unroll_time = sum(v[3] for k, v in stats.items() if k[2] == "estimate")
    started = time.perf_counter()
    trainer.evaluate()
    first_eval = time.perf_counter() - started
    started = time.perf_counter()
    trainer.evaluate()
    print(f"\nOutside the estimator's unrolls: {100 * (1 - unroll_time / total):.1f}% of a meta-iteration "
          f"({total:.2f} s, cProfile); a held-out evaluation: {first_eval:.1f} s the first time (tunes Adam), "
          f"{time.perf_counter() - started:.1f} s after; every --eval-every (25) iterations")


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
    parser.add_argument("--device", default="cpu", help="for the floor and trainer parts (cpu, cuda)")
    parser.add_argument("--parts", nargs="+", choices=["floor", "trainer", "batching", "memory"],
                        default=["floor", "trainer", "batching", "memory"])
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
    print(f"threads={args.threads} torch={torch.__version__} device={args.device}\n")
    if "floor" in args.parts:
        floor_table(args)
    if "trainer" in args.parts:
        print()
        trainer_table(args)
    if "batching" in args.parts:
        print()
        batching_table(args)
    if "memory" in args.parts:
        print()
        memory_table(args)


def batching_table(args: argparse.Namespace) -> None:
    """A meta-batch as one batched unroll against a Python loop over its tasks."""
    print("| family | tasks | unroll | loop over tasks: s/truncation | batched: s/truncation | speed-up |")
    print("|---|---|---|---|---|---|")
    for family, tasks in (("quadratic", 128), ("mnist-mlp", 8)):
        _truncation(family, tasks, 2, False)
        times = {}
        for loop in (True, False):
            times[loop] = statistics.median(_truncation(family, tasks, 20, loop) for _ in range(args.repeats))
        print(f"| {family} | {tasks} | 20 | {times[True]:.3f} | {times[False]:.3f} | {times[True] / times[False]:.1f}x |",
              flush=True)


def memory_table(args: argparse.Namespace) -> None:
    """Peak memory of one truncation, storing every step or recomputing segments (each row in a fresh process)."""
    print(f"Peak memory added by one truncation ({args.memory_family}, {args.memory_tasks} tasks, forward + backward)\n")
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
