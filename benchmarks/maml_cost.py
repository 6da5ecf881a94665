"""Time and peak memory of one MAML meta-iteration on an Omniglot meta-batch, as ratios measured in one run.

    python benchmarks/maml_cost.py [--meta-batch 8] [--channels 64] [--repeats 3] [--threads 1]

Rows: second- vs first-order MAML for 1, 5 and 10 inner steps (the memory burden grows with the steps when the
inner graph is kept); a Python loop over tasks, the shipped task-batched network (``baselines.batched``: grouped
convolutions, one unroll for the meta-batch) and ``torch.func.vmap`` over tasks; ours vs ``higher``.
Memory is what autograd saves for the backward pass in one meta-iteration (the part that grows with inner steps
and that first order saves); the loop frees it task by task, the batched path, vmap and higher hold it for the
whole batch. Each configuration runs in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

CONFIGS = [(order, steps, "loop") for steps in (1, 5, 10) for order in ("second", "first")] + [  # order, steps, path
    ("second", 1, "batched"),
    ("first", 1, "batched"),
    ("second", 5, "batched"),
    ("second", 1, "vmap"),
    ("second", 1, "higher"),
]


def _episodes(meta_batch: int):
    from learnedopt_experiments.baselines.episodes import EpisodeSampler
    from learnedopt_experiments.baselines.omniglot import load_omniglot

    sampler = EpisodeSampler(load_omniglot(), "train", 5, 1, 1)
    g = torch.Generator().manual_seed(0)
    return [sampler.sample(g) for _ in range(meta_batch)]


def _iteration(order: str, steps: int, path: str, meta_batch: int, channels: int):
    """One meta-iteration of MAML on a fixed meta-batch, by ``path``, as a callable."""
    from learnedopt_experiments.baselines.maml import maml_step
    from learnedopt_experiments.baselines.models import conv4

    torch.manual_seed(0)
    model = conv4(5, channels, strided=True)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    episodes = _episodes(meta_batch)

    if path in ("loop", "batched"):
        def iteration() -> None:
            maml_step(model, opt, episodes, steps, 0.4, first_order=(order == "first"), batched=(path == "batched"))
    elif path == "vmap":
        sx = torch.stack([e.support_x for e in episodes])
        sy = torch.stack([e.support_y for e in episodes])
        qx = torch.stack([e.query_x for e in episodes])
        qy = torch.stack([e.query_y for e in episodes])

        def support_loss(params, sx, sy):
            return nn.functional.cross_entropy(torch.func.functional_call(model, params, (sx,)), sy)

        def task_loss(params, sx, sy, qx, qy):
            for _ in range(steps):
                grads = torch.func.grad(support_loss)(params, sx, sy)
                params = {k: v - 0.4 * grads[k] for k, v in params.items()}
            return nn.functional.cross_entropy(torch.func.functional_call(model, params, (qx,)), qy)

        def iteration() -> None:
            opt.zero_grad()
            params = dict(model.named_parameters())
            losses = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy)
            losses.mean().backward()
            opt.step()
    else:
        import higher

        inner = torch.optim.SGD(model.parameters(), lr=0.4)

        def iteration() -> None:
            opt.zero_grad()
            for e in episodes:
                with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(nn.functional.cross_entropy(fmodel(e.support_x), e.support_y))
                    (nn.functional.cross_entropy(fmodel(e.query_x), e.query_y) / len(episodes)).backward()
            opt.step()

    return iteration


def _run_one(order: str, steps: int, path: str, meta_batch: int, channels: int, repeats: int) -> dict:
    iteration = _iteration(order, steps, path, meta_batch, channels)
    iteration()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - start)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            iteration()
    except RuntimeError:  # torch.func.grad (the vmap path) refuses saved-tensor hooks
        return {"seconds": statistics.median(times), "saved_mb": None}
    return {"seconds": statistics.median(times), "saved_mb": saved[0] / 2**20}


def _interleaved(args: argparse.Namespace) -> None:
    """Second-order, 1 step: loop, batched and higher timed in turn in one process, so background load hits all
    three alike; medians of ``repeats`` rounds."""
    paths = ("loop", "batched", "higher")
    runs = {p: _iteration("second", 1, p, args.meta_batch, args.channels) for p in paths}
    times: dict[str, list[float]] = {p: [] for p in paths}
    for run in runs.values():
        run()
    for _ in range(args.repeats):
        for p, run in runs.items():
            start = time.perf_counter()
            run()
            times[p].append(time.perf_counter() - start)
    median = {p: statistics.median(t) for p, t in times.items()}
    print(f"\nInterleaved in one process, second order, 1 inner step, median of {args.repeats} rounds:")
    print("| path | s / meta-iteration | time / higher |")
    print("|---|---|---|")
    for p in paths:
        print(f"| {p} | {median[p]:.3f} | {median[p] / median['higher']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=3, metavar=("ORDER", "STEPS", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        order, steps, path = args.one
        print(json.dumps(_run_one(order, int(steps), path, args.meta_batch, args.channels, args.repeats)))
        return
    results = {}
    for order, steps, path in CONFIGS:
        cmd = [sys.executable, __file__, "--one", order, str(steps), path, "--meta-batch", str(args.meta_batch),
               "--channels", str(args.channels), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{order}-order {path} x{steps} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        results[(order, steps, path)] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results[("second", 1, "loop")]
    print(f"meta-batch {args.meta_batch} of 5-way 1-shot Omniglot, Conv-4 ({args.channels} channels, stride 2), "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print("| MAML | inner steps | tasks batched by | s / meta-iteration | time / (2nd order, 1 step, loop) "
          "| MB saved for backward / meta-iteration | saved / (2nd order, 1 step, loop) |")
    print("|---|---|---|---|---|---|---|")
    for (order, steps, path), r in results.items():
        memory = "n/a | n/a" if r["saved_mb"] is None else f"{r['saved_mb']:.1f} | {r['saved_mb'] / base['saved_mb']:.2f}x"
        print(f"| {order} order | {steps} | {path} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f}x "
              f"| {memory} |")
    _interleaved(args)


if __name__ == "__main__":
    main()
