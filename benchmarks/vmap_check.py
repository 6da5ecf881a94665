"""Is second-order MAML under ``torch.func.vmap`` over tasks correct through BatchNorm? Compare it with the loop.

    python benchmarks/vmap_check.py [--meta-batch 4] [--steps 1] [--channels 8]

Computes the meta-gradient of one meta-batch of 5-way 1-shot Omniglot episodes for a Conv-4 with BatchNorm (batch
statistics), in float64, two ways: the shipped Python loop over tasks (:func:`baselines.maml.maml_step`'s path,
checked against finite differences and ``higher`` in the tests) and ``vmap`` of a ``torch.func.grad`` inner
loop. Prints the largest difference per parameter tensor; float64 agreement is ~1e-12 when both are right. (The
convolution biases feed BatchNorm, which cancels them: their true meta-gradient is zero.)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from learnedopt_experiments.baselines.episodes import EpisodeSampler
from learnedopt_experiments.baselines.maml import adapt
from learnedopt_experiments.baselines.models import conv4
from learnedopt_experiments.baselines.omniglot import load_omniglot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--channels", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = conv4(5, args.channels, strided=True).double()
    sampler = EpisodeSampler(load_omniglot(), "train", 5, 1, 1)
    g = torch.Generator().manual_seed(0)
    episodes = [sampler.sample(g) for _ in range(args.meta_batch)]
    episodes = [type(e)(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y) for e in episodes]
    params = dict(model.named_parameters())

    loop = sum(adapt(model, params, e, args.steps, 0.4).meta_loss for e in episodes) / len(episodes)
    loop_grads = torch.autograd.grad(loop, list(params.values()))

    def support_loss(p, sx, sy):
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (sx,)), sy)

    def task_loss(p, sx, sy, qx, qy):
        for _ in range(args.steps):
            grads = torch.func.grad(support_loss)(p, sx, sy)
            p = {k: v - 0.4 * grads[k] for k, v in p.items()}
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (qx,)), qy)

    stacked = [torch.stack([getattr(e, f) for e in episodes]) for f in ("support_x", "support_y", "query_x", "query_y")]
    vmapped = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *stacked).mean()
    vmap_grads = torch.autograd.grad(vmapped, list(params.values()))
    print(f"torch {torch.__version__}; meta-batch {args.meta_batch}, {args.steps} inner step(s), float64")
    print(f"meta-loss: loop {loop.item():.12f}, vmap {vmapped.item():.12f}")
    print("| parameter | max abs meta-gradient (loop) | max abs difference, vmap vs loop | relative |")
    print("|---|---|---|---|")
    for name, a, b in zip(params, loop_grads, vmap_grads):
        scale, diff = a.abs().max().item(), (a - b).abs().max().item()
        print(f"| {name} | {scale:.2e} | {diff:.2e} | {diff / max(scale, 1e-300):.1e} |")


if __name__ == "__main__":
    main()
