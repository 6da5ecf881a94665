"""Why a learned optimizer stalls on a long run: its step size and the weight norm over 10,000 steps.

    python benchmarks/long_run.py --optimizers net:general-lstm@anneal=off net:general-lstm adam:0.001

Runs the drop-in suite's ``mlp-relu-10k`` loop (benchmarks/drop_in.py: same model, minibatches and evaluation set)
on the tuning seed and prints a markdown table: at a few steps, the evaluation loss, the RMS of one step's
parameter update and the weights' norm. Optimizer names as in drop_in.py (``net:NAME[@anneal=N|off]``,
``adam:LR``).
"""

from __future__ import annotations

import argparse
import math

import torch

from drop_in import LOOPS, TUNE_SEED, _evaluate, _make_optimizer

MARKS = (1, 1000, 2500, 5000, 7500, 10_000)


def trace(optimizer: str, seed: int) -> dict[int, tuple[float, float, float]]:
    """(evaluation loss, update RMS, weight norm) after each step in ``MARKS``."""
    loop = next(loop for loop in LOOPS if loop.name == "mlp-relu-10k")
    data = loop.data()
    torch.manual_seed(seed)
    model = loop.model()
    params = list(model.parameters())
    opt = _make_optimizer(optimizer, params)
    marks = {}
    for step in range(1, loop.steps + 1):
        x, y = data.batch(seed, step - 1)
        opt.zero_grad()
        data.loss(model(x), y).backward()
        before = [p.detach().clone() for p in params] if step in MARKS else None
        opt.step()
        if before is not None:
            moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
            norm = float(torch.cat([p.detach().flatten() for p in params]).norm())
            marks[step] = (_evaluate(model, data)[0], float(moved.pow(2).mean().sqrt()), norm)
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=["net:general-lstm@anneal=off", "net:general-lstm",
                                                             "adam:0.001"])
    parser.add_argument("--seed", type=int, default=TUNE_SEED)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| optimizer | step | eval loss | update RMS | weight norm |\n|---|---|---|---|---|")
    for name in args.optimizers:
        for step, (loss, rms, norm) in trace(name, args.seed).items():
            loss_text = f"{loss:.4f}" if math.isfinite(loss) else "inf"
            print(f"| `{name}` | {step} | {loss_text} | {rms:.2e} | {norm:.1f} |", flush=True)


if __name__ == "__main__":
    main()
