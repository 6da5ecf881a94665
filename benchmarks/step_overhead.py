"""Cost of one ``LearnedOptimizer.step`` relative to ``torch.optim.Adam(foreach=True).step``, measured in one run.

    python benchmarks/step_overhead.py [--sizes 10000 100000 1000000] [--device cpu] [--repeats 5] [--threads 1]

Both optimizers step the same parameters (one weight matrix and one bias) with the same gradients; the table
gives median wall time per step, the ratio, peak extra memory of the optimizer state per parameter, and the
LearnedOptimizer's time at a few chunk sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from learnedopt import CoordinatewiseLSTM, LearnedOptimizer


def _params(n: int, device: str) -> list[torch.nn.Parameter]:
    cols = 1000 if n >= 10_000 else 10
    rows = n // cols
    params = [torch.nn.Parameter(torch.randn(rows, cols, device=device)), torch.nn.Parameter(torch.randn(cols, device=device))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _time_step(opt: torch.optim.Optimizer, repeats: int, device: str) -> float:
    opt.step()  # warm-up: allocates the state
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net = CoordinatewiseLSTM().to(args.device)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__}")
    header = "| parameters | Adam(foreach) step | " + " | ".join(f"LSTM step (chunk {c})" for c in args.chunk_sizes)
    print(header + " | best ratio LSTM/Adam | LSTM state bytes/param | Adam state bytes/param |")
    print("|---" * (len(args.chunk_sizes) + 5) + "|")
    for n in args.sizes:
        params = _params(n, args.device)
        adam = torch.optim.Adam(params, lr=1e-3, foreach=True)
        t_adam = _time_step(adam, args.repeats, args.device)
        adam_bytes = _state_bytes(adam) / n
        del adam
        lstm_times = []
        for chunk in args.chunk_sizes:
            opt = LearnedOptimizer(params, net=net, chunk_size=chunk)
            lstm_times.append(_time_step(opt, args.repeats, args.device))
            lstm_bytes = _state_bytes(opt) / n
            del opt
        cells = " | ".join(f"{t * 1e3:.2f} ms" for t in lstm_times)
        print(
            f"| {n:,} | {t_adam * 1e3:.2f} ms | {cells} | {min(lstm_times) / t_adam:.1f}x "
            f"| {lstm_bytes:.0f} | {adam_bytes:.0f} |"
        )


if __name__ == "__main__":
    main()
