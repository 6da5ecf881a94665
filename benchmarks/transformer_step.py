"""A whole training step of a GPT-2-small-like decoder with ``LearnedOptimizer`` against ``AdamW(fused=True)``.

    python benchmarks/transformer_step.py --device cuda [--layers 6] [--width 512] [--sequence 512] [--batch 0]
    python benchmarks/transformer_step.py --device cpu --layers 1 --width 64 --sequence 32 --batch 2 --steps 3

For each optimizer, in one process on the same model, data and batch: the optimizer step alone, the whole
training step (forward, backward, step), peak memory, tokens per second, and the learned optimizer's overhead
over AdamW in percent. ``--batch 0`` takes the largest power-of-two batch whose AdamW step fits in memory
(CUDA only). On CUDA the learned optimizer's step is the Triton kernel (``learnedopt.lstm.triton_step``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

import learnedopt


class Decoder(nn.Module):
    """A pre-norm causal transformer language model (GPT-2's shape, learned positions, tied embeddings)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, sequence: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(sequence, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        hidden = self.body(self.embed(tokens) + self.position[:n], mask=mask, is_causal=True)
        return self.norm(hidden) @ self.embed.weight.t()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer], args: argparse.Namespace,
            batch: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = Decoder(args.vocab, args.width, args.layers, args.heads, args.sequence).to(device)
    opt = make_opt(list(model.parameters()))
    tokens = torch.randint(0, args.vocab, (batch, args.sequence + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times, whole_times = [], []
    for i in range(args.warmup + args.steps):
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        stepping = time.perf_counter()
        opt.step()
        _sync(device)
        done = time.perf_counter()
        if i >= args.warmup:
            step_times.append(done - stepping)
            whole_times.append(done - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    whole = statistics.median(whole_times)
    return {"step_ms": 1e3 * statistics.median(step_times), "whole_ms": 1e3 * whole, "peak_gib": peak,
            "tokens_per_s": batch * args.sequence / whole, "loss": float(loss.detach()),
            "parameters": sum(p.numel() for p in model.parameters())}


def largest_batch(args: argparse.Namespace, device: torch.device) -> int:
    """The largest power-of-two batch whose AdamW training step fits (the learned optimizer's state is larger,
    so it is tried at that batch and halved until it fits too)."""
    batch = 1
    while batch < 4096:
        try:
            measure(lambda p: torch.optim.AdamW(p, fused=True), argparse.Namespace(**{**vars(args), "steps": 1,
                                                                                      "warmup": 0}), 2 * batch, device)
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        batch *= 2
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--sequence", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=0, help="0: the largest that fits (CUDA)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--state-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (largest_batch(args, device) if device.type == "cuda" else 8)
    state_dtype = getattr(torch, args.state_dtype)
    fused = device.type == "cuda"
    rows = {f"AdamW(fused={fused})": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=fused),
            f"LearnedOptimizer ({args.state_dtype} state)": lambda p: learnedopt.LearnedOptimizer(
                p, state_dtype=state_dtype)}
    results = {}
    for name, make in rows.items():
        for attempt in range(8):
            try:
                results[name] = (measure(make, args, batch, device), batch)
                break
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                batch //= 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} layers={args.layers} width={args.width} "
          f"sequence={args.sequence} vocab={args.vocab}")
    print("| optimizer | batch | parameters | optimizer step | whole training step | peak memory | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name, (r, b) in results.items():
        print(f"| {name} | {b} | {r['parameters'] / 1e6:.1f}M | {r['step_ms']:.2f} ms | {r['whole_ms']:.2f} ms "
              f"| {r['peak_gib']:.2f} GiB | {r['tokens_per_s']:,.0f} |")
    (adam, _), (lstm, _) = results.values()
    print(f"\nLearnedOptimizer / AdamW: optimizer step {lstm['step_ms'] / adam['step_ms']:.1f}x, whole training step "
          f"{lstm['whole_ms'] / adam['whole_ms']:.3f}x ({100 * (lstm['whole_ms'] / adam['whole_ms'] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
