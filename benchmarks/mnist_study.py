"""The generalization study of Andrychowicz et al. (2016, Figure 5) on MNIST, as one rerunnable command.

    python benchmarks/mnist_study.py [--seeds 20] [--nets mnist-lstm quadratic-lstm] [--out results/mnist]

Each row is one ``learnedopt benchmark`` run (tuned baselines, same initializations and minibatches for every
optimizer); the per-row table, JSON and PNG land in ``--out``, and the summary goes to ``results/mnist.md``
between the markers ``<!-- study -->`` and ``<!-- /study -->``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from learnedopt import DEFAULT_NET
from learnedopt.meta.evaluation import BASELINES
from learnedopt_experiments.meta_train.reports import benchmark, hardware

ROWS = [  # label, task, steps
    ("base MLP, 100 steps", "mnist-mlp", 100),
    ("base MLP, 200 steps", "mnist-mlp", 200),
    ("40 hidden units", "mnist-mlp-40", 100),
    ("2 hidden layers", "mnist-mlp-2layer", 100),
    ("ReLU", "mnist-mlp-relu", 100),
    ("conv net (not in the paper)", "mnist-conv", 100),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--nets", nargs="+", default=[DEFAULT_NET, "mnist-lstm"])
    parser.add_argument("--out", type=Path, default=Path("results/mnist"))
    parser.add_argument("--summary", type=Path, default=Path("results/mnist.md"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="*", default=None, help="only these row tasks (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/mnist_study.py " + shlex.join(sys.argv[1:])
    started = time.perf_counter()
    lines = []
    names = args.nets + list(BASELINES)
    header = "| row | " + " | ".join(names) + " |"
    lines += [header, "|---" * (len(names) + 1) + "|"]
    for label, task, steps in ROWS:
        if args.rows and task not in args.rows:
            continue
        name = f"{task}-{steps}"
        benchmark(task, args.nets, steps, args.seeds, list(BASELINES), args.out, name, command)
        rows = {r["optimizer"]: r for r in _summary(args.out / f"{name}.json")}
        cells = []
        for opt in names:
            r = rows[opt]
            ratio = r["median_ratio"]
            mark = " ✓" if opt in args.nets and ratio < 1 else ""
            cells.append(f"{r['median']:.3f} ({ratio:.2f}×{mark}), {100 * r['test_accuracy']:.1f}%")
        lines.append(f"| [{label}](mnist/{name}.md) | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    minutes = (time.perf_counter() - started) / 60
    table = "\n".join(lines)
    block = (
        f"<!-- study -->\nCommand: `{command}` ({minutes:.0f} min on {hardware()})\n\n"
        f"Cells: median over {args.seeds} held-out seeds of the final parameters' loss on a fixed 10,000-image "
        f"subset of the training set (ratio to tuned Adam's median; ✓ where a learned net beats it), mean test "
        f"accuracy after the run. Learning rates were tuned on the same fixed-set score, on separate seeds."
        f"\n\n{table}\n<!-- /study -->"
    )
    text = args.summary.read_text() if args.summary.is_file() else "# MNIST study\n\n<!-- study --><!-- /study -->\n"
    args.summary.write_text(re.sub(r"<!-- study -->.*<!-- /study -->", lambda _: block, text, flags=re.S))
    print(f"wrote {args.summary}")


def _summary(path: Path) -> list[dict[str, object]]:
    from learnedopt_experiments.meta_train.evaluate import Curves

    return Curves.load_json(path).summary()


if __name__ == "__main__":
    main()
