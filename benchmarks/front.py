"""The quality x cost front of coordinatewise LSTM nets (issue 20, item 3), in one run on one thread.

    python benchmarks/front.py RUN_OR_NET [RUN_OR_NET ...] [--out results/front] [--size 1000000]

For each net (a run folder, a ``net.pt`` or a packaged name): its size, FLOPs and hidden-state bytes per
parameter (float32 and bfloat16), the median ``LearnedOptimizer`` step at ``--size`` parameters with a float32
and a bfloat16 hidden state against ``Adam(foreach=True)``'s, measured alternately in the same run, and its
quality as the meta-trainer's best held-out score (mean log-ratio of final loss to tuned Adam on the tuning tasks; < 0 beats Adam) with the
iteration and wall-clock at which it was reached. Writes ``OUT.md`` (table) and ``OUT.png`` (the front).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

import learnedopt
from learnedopt_experiments.meta_train.reports import hardware
from step import _params, lstm_flops_per_coordinate, median_time  # noqa: E402  (the script's own folder)


def state_bytes(net: learnedopt.CoordinatewiseLSTM, dtype: torch.dtype) -> int:
    """Per-parameter state: ``h`` and ``c`` in ``dtype``, the moments (and nothing else) in float32."""
    shapes = net.state_shapes(1)
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(torch.Size(s).numel() * (size if k in ("h", "c") else 4) for k, s in shapes.items())


def _middle_ms(seconds: list[float]) -> float:
    """The middle of the repeats' times (the upper one of an even count), in milliseconds."""
    return 1e3 * sorted(seconds)[len(seconds) // 2]


def measure(name: str, size: int, repeats: int) -> dict:
    net = learnedopt.load_net(name)
    info = learnedopt.net_info(name)
    params = _params(size, "cpu")
    lstm = learnedopt.LearnedOptimizer(params, net=net)
    lstm16 = learnedopt.LearnedOptimizer(params, net=net, state_dtype=torch.bfloat16)
    adam = torch.optim.Adam(params, lr=1e-3, foreach=True)
    t_lstm, t_lstm16, t_adam = [], [], []
    for _ in range(repeats):  # alternating, so that a busy neighbour slows all alike
        t_lstm.append(median_time(lstm.step, 3, "cpu"))
        t_lstm16.append(median_time(lstm16.step, 3, "cpu"))
        t_adam.append(median_time(adam.step, 3, "cpu"))
    history = info.get("history", [])
    best = min(history, key=lambda h: h["eval/score"]) if history else {}
    c = net.config
    return {"name": name, "arch": f"{c.hidden_size} x {c.num_layers}", "flops": lstm_flops_per_coordinate(net),
            "bytes32": state_bytes(net, torch.float32), "bytes16": state_bytes(net, torch.bfloat16),
            "lstm_ms": _middle_ms(t_lstm), "lstm16_ms": _middle_ms(t_lstm16), "adam_ms": _middle_ms(t_adam),
            "score": best.get("eval/score", float("nan")), "iteration": best.get("iteration"),
            "evaluations": len(history), "task": info.get("task", "?")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nets", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("results/front"))
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, args.size, args.repeats) for name in args.nets]
    command = "python " + shlex.join([sys.argv[0], *sys.argv[1:]])
    lines = [f"Command: `{command}`  ", f"Hardware: {hardware()}", "",
             "| net | hidden x layers | FLOPs / parameter | state bytes / parameter (float32 / bfloat16 h, c) "
             f"| step at {args.size:,} parameters | / Adam's | bfloat16 h, c: step, / Adam's "
             "| best held-out score (iteration) | trained on |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['arch']} | {r['flops']:,} | {r['bytes32']} / {r['bytes16']} "
                     f"| {r['lstm_ms']:.1f} ms | {r['lstm_ms'] / r['adam_ms']:.0f}x "
                     f"| {r['lstm16_ms']:.1f} ms, {r['lstm16_ms'] / r['adam_ms']:.0f}x | {r['score']:+.3f} "
                     f"({r['iteration']}) | {r['task']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["lstm_ms"] / r["adam_ms"], r["score"], s=40)
        ax.annotate(f"{r['arch']}", (r["lstm_ms"] / r["adam_ms"], r["score"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"step time / Adam's step ({args.size:,} parameters, one CPU thread)")
    ax.set_ylabel("best held-out score (log final loss / tuned Adam's)")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
