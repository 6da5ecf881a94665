"""Meta-train a learned optimizer for your own model and data, then use it like any torch.optim optimizer.

    python examples/meta_train_your_model.py            # a few CPU minutes: writes runs/my-cnn/net.pt
    python examples/meta_train_your_model.py --quick    # a smoke run in well under a minute

The model is a small LeNet-style CNN (none of the packaged nets saw it), the data MNIST from the data root
(``--data-dir``, ``$LEARNEDOPT_DATA``, ``../shared/data``) or, when there is none, synthetic 28x28 images.
Meta-training starts from the packaged default net and adapts it to this model; afterwards a fresh model is
trained with the result, with the packaged default net and with Adam, on the same minibatches.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

import learnedopt
from learnedopt_experiments.data import resolve_data_root


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 12, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 5 * 5, 10),
    )


def load_data(data_dir: str | None, examples: int) -> tuple[Tensor, Tensor, str]:
    """MNIST training images as tensors, or synthetic class prototypes plus noise when MNIST is not there."""
    from torchvision.datasets import MNIST

    try:
        mnist = MNIST(str(resolve_data_root(data_dir)), train=True, download=False)
        images = mnist.data[:examples].float().div(255).sub(0.1307).div(0.3081).unsqueeze(1)
        return images, mnist.targets[:examples], "MNIST"
    except RuntimeError:  # torchvision: "Dataset not found"
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 10, (examples,), generator=g)
        prototypes = torch.randn(10, 1, 28, 28, generator=g)
        return prototypes[labels] + 2.0 * torch.randn(examples, 1, 28, 28, generator=g), labels, "synthetic images"


def train_fresh(make_optimizer, images: Tensor, labels: Tensor, steps: int, batch_size: int) -> float:
    """Train a new CNN (the same initialization and minibatches for every optimizer); its final training loss."""
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = make_optimizer(model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        index = torch.randint(0, len(labels), (batch_size,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
        optimizer.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(images), labels).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/my-cnn", help="run folder (net.pt, checkpoints, TensorBoard)")
    parser.add_argument("--quick", action="store_true", help="a few iterations only (what CI runs)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--meta-lr", type=float, default=1e-4, help="Adam learning rate on the LSTM's weights")
    args = parser.parse_args()
    torch.set_num_threads(1)
    examples, iterations, horizon, steps, scored = (2048, 2, 10, 20, 256) if args.quick else (20_000, 60, 50, 200, 5000)
    images, labels, source = load_data(args.data_dir, examples)

    # 1. Your model, data and loss become a task family: each task a fresh initialization and minibatch order.
    family = learnedopt.ModuleFamily(small_cnn, (images, labels), nn.functional.cross_entropy, batch_size=64,
                                     name="my-cnn", eval_examples=scored)
    # 2. Meta-train (truncated backprop, held-out selection, checkpoints, TensorBoard in OUT/tb). second_order:
    #    the exact meta-gradient of each truncation. Fine-tuning a good net with Andrychowicz et al.'s first-order
    #    approximation (the optimizee's gradients taken as inputs) made it worse on held-out tasks at every
    #    meta-lr and horizon tried; the exact one improves it (results/examples.md).
    started = time.perf_counter()
    learnedopt.meta_train(
        family, args.out, iterations=iterations, horizon=horizon, unroll=10 if horizon % 10 == 0 else horizon,
        meta_batch=4, eval_every=iterations if args.quick else 15, eval_tasks=4, eval_lengths=(horizon,) if args.quick else (horizon, 4 * horizon),
        init_net=learnedopt.DEFAULT_NET, second_order=True,
        meta_lr=args.meta_lr, resume=args.resume, overwrite=not args.resume, progress=not args.quick,
    )
    print(f"meta-trained on {source} in {time.perf_counter() - started:.0f} s: {args.out}/net.pt")

    # 3. Use it in an ordinary training loop, against the packaged default net and Adam.
    rows = {
        "LearnedOptimizer (net.pt)": lambda p: learnedopt.LearnedOptimizer(p, net=f"{args.out}/net.pt"),
        f"LearnedOptimizer ({learnedopt.DEFAULT_NET})": lambda p: learnedopt.LearnedOptimizer(p),
        "Adam (lr=1e-3)": lambda p: torch.optim.Adam(p, lr=1e-3),
    }
    print(f"final training loss of a fresh CNN after {steps} steps:")
    for name, make in rows.items():
        print(f"  {name:<34} {train_fresh(make, images, labels, steps, 64):.4f}")


if __name__ == "__main__":
    main()
