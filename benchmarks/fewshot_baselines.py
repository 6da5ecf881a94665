"""Non-meta-learned few-shot baselines on Omniglot test episodes, for results/fewshot.md.

    python benchmarks/fewshot_baselines.py [--episodes 200] [--pretrain-epochs 1] [--steps 50]
        [--inits "random init" pre-trained] [--optimizers Adam SGD] [--settings 5:1 5:5 20:1 20:5]

Rows: nearest neighbour in pixel space; a Conv-4 fine-tuned on each support set with Adam and with SGD, from a
random initialization and from a network pre-trained as an ordinary classifier over all training classes (the
"fine-tuning" rows of the MAML and matching-networks papers). Learning rates come from a small grid chosen on
validation episodes, never on the test episodes that are reported.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

from learnedopt_experiments.baselines.episodes import Episode, EpisodeSampler
from learnedopt_experiments.baselines.models import conv4
from learnedopt_experiments.baselines.omniglot import load_omniglot

GRID = {"Adam": [1e-4, 1e-3, 1e-2], "SGD": [1e-2, 1e-1, 1.0]}
INITS = ["random init", "pre-trained"]  # the fine-tuned Conv-4's starting weights


def nearest_neighbour(episode: Episode) -> float:
    distances = torch.cdist(episode.query_x.flatten(1), episode.support_x.flatten(1))
    predicted = episode.support_y[distances.argmin(dim=1)]
    return float((predicted == episode.query_y).float().mean())


def fine_tuned(
    body: nn.Module, episode: Episode, ways: int, make_optimizer: Callable[[Any], torch.optim.Optimizer], steps: int
) -> nn.Module:
    """A copy of ``body`` with a fresh linear head, trained (head and body) on the support set for ``steps``."""
    model = nn.Sequential(copy.deepcopy(body), nn.LazyLinear(ways))
    model(episode.support_x[:1])  # materialize the lazy head
    opt = make_optimizer(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(episode.support_x), episode.support_y).backward()
        opt.step()
    return model


def fine_tune(body: nn.Module, episode: Episode, ways: int, optimizer: str, lr: float, steps: int) -> float:
    """Query accuracy after :func:`fine_tuned` with Adam or SGD at ``lr``."""
    optimizer_class = torch.optim.Adam if optimizer == "Adam" else torch.optim.SGD
    model = fine_tuned(body, episode, ways, lambda params: optimizer_class(params, lr=lr), steps)
    with torch.no_grad():
        return float((model(episode.query_x).argmax(-1) == episode.query_y).float().mean())


def pretrain(data, epochs: int, channels: int, seed: int) -> nn.Module:
    """An ordinary classifier over every (character, rotation) class of the training split."""
    torch.manual_seed(seed)
    classes = data.split("train")
    body = conv4(None, channels)
    model = nn.Sequential(body, nn.Linear(channels, len(classes)))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    images = torch.stack([torch.rot90(data.images[c], r, dims=(-2, -1)) for c, r in classes])  # (C, 20, 28, 28)
    labels = torch.arange(len(classes)).repeat_interleave(images.shape[1])
    images = images.reshape(-1, 1, 28, 28)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=g).split(256):
            opt.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            opt.step()
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--val-episodes", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--settings", nargs="+", default=["5:1", "5:5", "20:1", "20:5"], help="WAYS:SHOTS")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--inits", nargs="+", choices=INITS, default=INITS, help="fine-tuning rows")
    parser.add_argument("--optimizers", nargs="+", choices=list(GRID), default=list(GRID), help="fine-tuning rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_omniglot()
    started = time.perf_counter()
    bodies = {init: pretrain(data, args.pretrain_epochs, args.channels, 0) if init == "pre-trained"
              else conv4(None, args.channels) for init in args.inits}
    pretrain_minutes = (time.perf_counter() - started) / 60
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings]
    rows: dict[str, list[str]] = {"nearest neighbour (pixels)": []}
    for ways, shots in settings:
        test = EpisodeSampler(data, "test", ways, shots, 15)
        val = EpisodeSampler(data, "val", ways, shots, 15)
        test_eps = [test.sample(torch.Generator().manual_seed(i)) for i in range(args.episodes)]
        val_eps = [val.sample(torch.Generator().manual_seed(10_000 + i)) for i in range(args.val_episodes)]
        rows["nearest neighbour (pixels)"].append(_cell([nearest_neighbour(e) for e in test_eps]))
        for init, body in bodies.items():
            for opt_name in args.optimizers:
                grid = GRID[opt_name]
                lr = max(grid, key=lambda lr: sum(fine_tune(body, e, ways, opt_name, lr, args.steps) for e in val_eps))
                scores = [fine_tune(body, e, ways, opt_name, lr, args.steps) for e in test_eps]
                rows.setdefault(f"fine-tune {init}, {opt_name}", []).append(_cell(scores) + f" (lr {lr:g})")
        print(f"done {ways}-way {shots}-shot", flush=True)
    print(f"\nCommand: python benchmarks/fewshot_baselines.py {shlex.join(sys.argv[1:])}; pre-training "
          f"{pretrain_minutes:.1f} min, total {(time.perf_counter() - started) / 60:.1f} min, {args.threads} "
          f"thread(s), torch {torch.__version__}\n")
    print("| baseline | " + " | ".join(f"{w}-way {s}-shot" for w, s in settings) + " |")
    print("|---" * (len(settings) + 1) + "|")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


def _cell(scores: list[float]) -> str:
    t = torch.tensor(scores)
    return f"{100 * t.mean():.1f} ± {100 * 1.96 * t.std() / math.sqrt(len(t)):.1f}"


if __name__ == "__main__":
    main()
