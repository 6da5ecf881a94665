"""Cost of one ``LearnedOptimizer.step`` against its compute floor and against ``Adam(foreach=True)``, in one run.

    python benchmarks/step.py [--sizes 10000 100000 1000000 10000000] [--threads 1] [--device cpu]
                              [--compile] [--state-dtype bfloat16] [--chunk-size 16384] [--repeats 3]
                              [--archs paper general] [--nets general-lstm runs/x/net.pt ...]

``--archs`` picks the nets' architectures (the step's cost does not depend on the weights): ``paper`` is the
paper's LSTM (log/sign inputs, linear head); ``general`` the default net's (normalized multi-timescale inputs,
bounded Adam-modulating output), whose extra running moments cost the ``moments`` FLOPs below.

For each size the table gives: the median step time (the default path: on a CPU the fused C kernel of
``learnedopt._kernel``); the same step through torch ops (``backend="torch"``) and the kernel's speed-up over it; the LSTM's floating-point operations per step (the
gate matmuls, biases, the elementwise cell math with a transcendental counted as one operation, the head and
the gradient preprocessing); the *floor* = those FLOPs / the GEMM rate of the gate-matmul shape measured in
this run on this device and thread count (what the step would cost if everything ran as fast as the matmuls);
time / floor; time / ``Adam(foreach=True)``'s step on the same parameters; and optimizer state bytes per
parameter. The parameters are one ``(n / 1000) x 1000`` weight and a 1000-element bias.

The floor counts a sigmoid as one FLOP at GEMM speed, which no CPU achieves; so the last columns add a
*roofline* (floor_sum): the GEMM floor, plus the cell's 200 sigmoid/tanh evaluations per coordinate at the rate
that ``torch.sigmoid`` reaches on a cache-sized tensor, plus the optimizer state read and written once at the
measured copy bandwidth — each rate measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch

from learnedopt import CoordinatewiseLSTM, LearnedOptimizer, load_net


def lstm_flops_per_coordinate(net: CoordinatewiseLSTM) -> int:
    """Floating-point operations of one coordinate's LSTM step (each elementwise op, exp/tanh included, = 1)."""
    hidden, layers = net.config.hidden_size, net.config.num_layers
    config = net.config
    if config.uses_moments:  # per momentum: lerp, bias correction, scale; v: square, lerp, correction, sqrt...
        preprocess = 4 * len(config.momentum_decays) + 8 + 8  # ... and the bounded output map
    else:
        preprocess = 6  # abs, compare, log, scale, sign, select
    total = preprocess
    inputs = config.input_size
    for _ in range(layers):
        gates = 4 * hidden
        total += 2 * (inputs + hidden) * gates + gates  # the fused matmul of [x, h] and the bias
        total += 3 * hidden + 2 * hidden  # sigmoid on three gates, tanh on the candidate and on the new cell
        total += 3 * hidden + hidden  # c' = f*c + i*g and h' = o*tanh(c')
        inputs = hidden
    outputs = net.head.out_features
    return total + outputs * (2 * hidden + 1) + 1  # head (dot products + bias) and the output scale


def gemm_rate(net: CoordinatewiseLSTM, rows: int, device: str, repeats: int = 20) -> float:
    """FLOP/s of the LSTM's gate matmuls, ``(rows, in + hidden) @ (in + hidden, 4 hidden)`` for each layer."""
    hidden = net.config.hidden_size
    widths = [net.config.input_size + hidden] + [2 * hidden] * (net.config.num_layers - 1)
    xs = [torch.randn(rows, w, device=device) for w in widths]
    ws = [torch.randn(w, 4 * hidden, device=device) for w in widths]
    outs = [torch.empty(rows, 4 * hidden, device=device) for _ in widths]

    def run() -> None:
        for x, w, out in zip(xs, ws, outs):
            torch.mm(x, w, out=out)

    seconds = median_time(run, repeats, device)
    return sum(2 * rows * w * 4 * hidden for w in widths) / seconds


def transcendentals_per_coordinate(net: CoordinatewiseLSTM) -> int:
    """Sigmoids and tanhs of one coordinate's step: 3 gate sigmoids, the candidate's and the cell's tanh."""
    return net.config.num_layers * 5 * net.config.hidden_size


def elementwise_rate(
    rows: int, hidden: int, device: str, repeats: int = 20, function: Callable[..., torch.Tensor] = torch.sigmoid
) -> float:
    """``function`` evaluations per second on a chunk-sized tensor. ``torch.sigmoid`` is the cell's only
    transcendental (it computes tanh as ``2 sigmoid(2x) - 1``, because ``torch.tanh`` runs far slower on some
    CPUs: the table's header prints both rates)."""
    x = torch.randn(rows, 4 * hidden, device=device)
    out = torch.empty_like(x)
    seconds = median_time(lambda: function(x, out=out), repeats, device)
    return x.numel() / seconds


def copy_bandwidth(numel: int, device: str, repeats: int = 5) -> float:
    """Bytes per second read plus written by a large ``copy_`` (the hidden state is far larger than any cache)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * src.element_size() / seconds


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int, device: str) -> float:
    fn()  # warm-up: allocates state, compiles
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _params(n: int, device: str) -> list[torch.nn.Parameter]:
    cols = 1000
    weight = torch.nn.Parameter(torch.randn(max(n // cols - 1, 1), cols, device=device))
    params = [weight, torch.nn.Parameter(torch.randn(cols, device=device))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=16384)
    parser.add_argument("--compile", action="store_true", help="LearnedOptimizer(compile=True)")
    parser.add_argument("--state-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=["paper", "general"])
    parser.add_argument("--nets", nargs="+", default=[],
                        help="also (or, with --archs none given, only) these nets: packaged names or net.pt files")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nets = {arch: ARCHS[arch]() for arch in args.archs} if not args.nets or "--archs" in sys.argv else {}
    nets.update({name: load_net(name) for name in args.nets})
    for name, net in nets.items():
        c = net.config
        print(f"\n### {name} (hidden {c.hidden_size} x {c.num_layers} layers, inputs {c.inputs}, output {c.output})")
        _table(net.to(args.device), args)


ARCHS: dict[str, Callable[[], CoordinatewiseLSTM]] = {
    "paper": CoordinatewiseLSTM,
    "general": lambda: CoordinatewiseLSTM(inputs="normalized", output="adam", output_scale=1e-3),
}


def _table(net: CoordinatewiseLSTM, args: argparse.Namespace) -> None:
    flops = lstm_flops_per_coordinate(net)
    rate = gemm_rate(net, args.chunk_size, args.device)
    transcendental_rate = elementwise_rate(args.chunk_size, net.config.hidden_size, args.device)
    tanh_rate = elementwise_rate(args.chunk_size, net.config.hidden_size, args.device, function=torch.tanh)
    bandwidth = copy_bandwidth(20_000_000, args.device)
    state_dtype = getattr(torch, args.state_dtype)
    print(
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} chunk={args.chunk_size} "
        f"compile={args.compile} state_dtype={args.state_dtype}; LSTM FLOPs/coordinate={flops:,}; "
        f"gate-matmul GEMM rate={rate / 1e9:.1f} GFLOP/s; sigmoid rate={transcendental_rate / 1e9:.2f} G/s "
        f"(torch.tanh: {tanh_rate / 1e9:.2f} G/s); "
        f"copy bandwidth={bandwidth / 1e9:.1f} GB/s"
    )
    print("| parameters | LSTM step | torch ops (backend=torch) | speed-up | LSTM GFLOP/step | floor | time / floor "
          "| Adam(foreach) step | time / Adam | LSTM state bytes/param | Adam state bytes/param | roofline "
          "| time / roofline |")
    print("|---" * 13 + "|")
    for n in args.sizes:
        params = _params(n, args.device)
        n = sum(p.numel() for p in params)
        adam = torch.optim.Adam(params, lr=1e-3, foreach=True)
        t_adam = median_time(adam.step, args.repeats, args.device)
        adam_bytes = _state_bytes(adam) / n
        del adam
        times = {}
        for backend in ("torch", "auto"):
            opt = LearnedOptimizer(params, net=net, chunk_size=args.chunk_size, compile=args.compile,
                                   state_dtype=state_dtype, backend=backend)
            times[backend] = median_time(opt.step, args.repeats, args.device)
            lstm_bytes = _state_bytes(opt) / n
            del opt
        t_lstm, t_ops = times["auto"], times["torch"]
        floor = flops * n / rate
        roofline = floor + transcendentals_per_coordinate(net) * n / transcendental_rate + 2 * lstm_bytes * n / bandwidth
        print(
            f"| {n:,} | {t_lstm * 1e3:.2f} ms | {t_ops * 1e3:.2f} ms | {t_ops / t_lstm:.2f}x | {flops * n / 1e9:.3f} | {floor * 1e3:.2f} ms | {t_lstm / floor:.1f}x "
            f"| {t_adam * 1e3:.2f} ms | {t_lstm / t_adam:.0f}x | {lstm_bytes:.0f} | {adam_bytes:.0f} "
            f"| {roofline * 1e3:.2f} ms | {t_lstm / roofline:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
