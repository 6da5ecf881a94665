"""Every method's cost, side by side in one run: meta-training, adaptation to one new task, and inference.

    python benchmarks/cost_table.py [--episodes 50] [--threads 1] [--pretrain-epochs 1] [--out results/cost.md]

Omniglot 5-way 1-shot (Vinyals test split) and 5-shot sinusoid regression. For each method, on the same test
episodes: its score; *adaptation* — the median time to adapt to one new task, and the peak memory of the first
adaptation in the process (resident-set growth, Linux VmHWM reset before it; later adaptations reuse freed memory); *inference* — the median time to predict one query set (75 images; 10
points) with the adapted model. Each method runs in a fresh process, so one method's allocations do not hide
another's peak. *Meta-training* is the wall-clock that produced the weights used: pre-training the Conv-4 for
the fine-tuning rows is measured in this run; the meta-learned checkpoints' budgets are those of their committed
runs (results/fewshot.md, results/generalization.md: one contended CPU thread), not rerun here.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

import learnedopt
from learnedopt_experiments.baselines import load_checkpoint
from learnedopt_experiments.baselines.train import inner_update
from learnedopt_experiments.baselines.episodes import Episode, EpisodeSampler, sample_sinusoids
from learnedopt_experiments.baselines.maml import adapt
from learnedopt_experiments.baselines.models import conv4
from learnedopt_experiments.baselines.omniglot import load_omniglot
from learnedopt_experiments.baselines.protonet import prototype_logits
from fewshot_baselines import fine_tuned, pretrain
from learnedopt_experiments.meta_train.reports import hardware

CHECKPOINTS = Path(__file__).resolve().parents[1] / "results" / "checkpoints"
FINE_TUNE_STEPS = 30
SINUSOID_STEPS = 5

# name -> (task, meta-training as recorded where it is not measured here)
METHODS: dict[str, tuple[str, str]] = {
    "Adam, fine-tuning a pre-trained Conv-4 (lr 1e-3, 30 steps)": ("omniglot", "pre-training (this run)"),
    "SGD, fine-tuning a pre-trained Conv-4 (lr 0.1, 30 steps)": ("omniglot", "pre-training (this run)"),
    "LearnedOptimizer (default net), fine-tuning a pre-trained Conv-4 (30 steps)": (
        "omniglot", "pre-training (this run) + the default net's ~65 min of meta-training (results/generalization.md)"),
    "MAML, second order (3 SGD steps at test)": ("omniglot", "120 min (results/fewshot.md)"),
    "MAML, first order (3 SGD steps at test)": ("omniglot", "14 min (results/fewshot.md)"),
    "ProtoNet": ("omniglot", "60 min (results/fewshot.md)"),
    "Matching networks (no FCE)": ("omniglot", "19 min (results/fewshot.md)"),
    "meta-learner LSTM (Ravi & Larochelle; 5 gated steps)": ("omniglot", "122 min (results/fewshot.md)"),
    "MAML, SGD inner rule (5 steps at test)": ("sinusoid", "7 min (results/fewshot.md)"),
    "MAML with the LSTM inner rule (5 steps at test)": ("sinusoid", "7 min (results/fewshot.md)"),
    "pre-trained regressor + 5 SGD steps (the MAML paper's baseline)": ("sinusoid", "7 min (results/fewshot.md)"),
}

Adapter = Callable[[Episode], Any]
Predictor = Callable[[Any, Episode], Tensor]


def _fine_tuner(body_path: str, make_optimizer: Callable[[Any], torch.optim.Optimizer]) -> tuple[Adapter, Predictor]:
    body = conv4(None, 64)
    body.load_state_dict(torch.load(body_path, weights_only=True))

    def adapt_one(episode: Episode) -> nn.Module:
        torch.manual_seed(0)  # the same head initialization for every optimizer
        return fine_tuned(body, episode, 5, make_optimizer, FINE_TUNE_STEPS)

    return adapt_one, lambda model, episode: model(episode.query_x)


def _maml(checkpoint: str, steps: int) -> tuple[Adapter, Predictor]:
    model, config, inner_net = load_checkpoint(CHECKPOINTS / checkpoint)
    criterion = nn.functional.mse_loss if config.dataset == "sinusoid" else nn.functional.cross_entropy
    lr = config.inner_lr or 0.01  # the pre-trained regressor was trained without an inner loop
    inner = inner_update(replace(config, inner_lr=lr), inner_net)

    def adapt_one(episode: Episode) -> dict[str, Tensor]:
        params = {k: v.detach() for k, v in model.named_parameters()}
        with torch.no_grad():  # test-time adaptation: inner gradients only, no meta-graph
            return adapt(model, params, episode, steps, inner, criterion, first_order=True).params

    return adapt_one, lambda params, episode: torch.func.functional_call(model, params, (episode.query_x,))


def _protonet() -> tuple[Adapter, Predictor]:
    model, _, _ = load_checkpoint(CHECKPOINTS / "protonet-omniglot-60w1s-60min.pt")

    def adapt_one(episode: Episode) -> Tensor:
        with torch.no_grad():
            return model(episode.support_x)  # adaptation is embedding the support set

    return adapt_one, lambda support, episode: prototype_logits(support, episode.support_y, model(episode.query_x), 5)


def _matching() -> tuple[Adapter, Predictor]:
    model, _, _ = load_checkpoint(CHECKPOINTS / "matching-omniglot-5w1s.pt")
    # nothing is adapted: the support set is read, together with the queries, at inference
    return lambda episode: None, lambda _, episode: model(episode.support_x, episode.support_y, episode.query_x)


def _method(name: str, body_path: str) -> tuple[Adapter, Predictor]:
    if name.startswith("Adam"):
        return _fine_tuner(body_path, lambda p: torch.optim.Adam(p, lr=1e-3))
    if name.startswith("SGD"):
        return _fine_tuner(body_path, lambda p: torch.optim.SGD(p, lr=0.1))
    if name.startswith("LearnedOptimizer"):
        return _fine_tuner(body_path, lambda p: learnedopt.LearnedOptimizer(p))
    if name.startswith("MAML, second"):
        return _maml("maml-omniglot-5w1s-120min.pt", 3)
    if name.startswith("MAML, first"):
        return _maml("fomaml-omniglot-5w1s.pt", 3)
    if name == "ProtoNet":
        return _protonet()
    if name.startswith("Matching"):
        return _matching()
    if name.startswith("meta-learner LSTM"):
        return _maml("metalstm-omniglot-5w1s-122min.pt", 5)
    if name.startswith("MAML, SGD"):
        return _maml("maml-sinusoid-5shot.pt", SINUSOID_STEPS)
    if name.startswith("MAML with the LSTM"):
        return _maml("maml-lstm-sinusoid-5shot.pt", SINUSOID_STEPS)
    return _maml("pretrained-sinusoid-5shot.pt", SINUSOID_STEPS)


def _episodes(task: str, count: int) -> list[Episode]:
    if task == "sinusoid":
        return [sample_sinusoids(5, 10, torch.Generator().manual_seed(i)) for i in range(count)]
    sampler = EpisodeSampler(load_omniglot(), "test", 5, 1, 15)
    return [sampler.sample(torch.Generator().manual_seed(i)) for i in range(count)]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError("the memory column needs Linux (/proc/self/status)")


def child(name: str, body_path: str, count: int) -> dict[str, float]:
    """Measure one method in this (fresh) process."""
    task = METHODS[name][0]
    episodes = _episodes(task, count)
    adapt_one, predict = _method(name, body_path)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    before = _status_kb("VmRSS")
    state = adapt_one(episodes[0])  # the first adaptation: later ones reuse what the allocator keeps
    peak_mb = (_status_kb("VmHWM") - before) / 1024
    with torch.no_grad():
        predict(state, episodes[0])  # warm-up for the timings
    adapt_times, infer_times, scores = [], [], []
    for episode in episodes:
        started = time.perf_counter()
        state = adapt_one(episode)
        adapt_times.append(time.perf_counter() - started)
        with torch.no_grad():
            started = time.perf_counter()
            prediction = predict(state, episode)
            infer_times.append(time.perf_counter() - started)
        if task == "sinusoid":
            scores.append(float(nn.functional.mse_loss(prediction, episode.query_y)))
        else:
            scores.append(float((prediction.argmax(-1) == episode.query_y).float().mean()))
    t = torch.tensor(scores)
    return {
        "score": float(t.mean()), "ci": float(1.96 * t.std() / math.sqrt(len(t))), "peak_mb": peak_mb,
        "adapt_s": statistics.median(adapt_times), "infer_s": statistics.median(infer_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--body", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.body, args.episodes)))
        return
    started = time.perf_counter()
    body = pretrain(load_omniglot(), args.pretrain_epochs, 64, 0)
    pretrain_min = (time.perf_counter() - started) / 60
    with tempfile.TemporaryDirectory() as tmp:
        body_path = str(Path(tmp) / "body.pt")
        torch.save(body.state_dict(), body_path)
        rows = {}
        for name in METHODS:
            command = [sys.executable, __file__, "--child", name, "--body", body_path, "--episodes",
                       str(args.episodes), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name}: {rows[name]}", flush=True)
    lines = [
        f"Command: `python benchmarks/cost_table.py {shlex.join(sys.argv[1:])}` ({args.episodes} test episodes per "
        f"method, the same for every method; {hardware()}; total {(time.perf_counter() - started) / 60:.1f} min; pre-training the Conv-4 "
        f"({args.pretrain_epochs} epoch over the 4112 training classes) took {pretrain_min:.1f} min in this run)",
        "",
        "| method | task | score (95% CI) | meta-training | adaptation: time per task | adaptation: peak memory "
        "| inference: time per query set |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        task, meta = METHODS[name]
        if task == "omniglot":
            score, label = f"{100 * row['score']:.1f}% ± {100 * row['ci']:.1f}", "Omniglot 5-way 1-shot"
        else:
            score, label = f"MSE {row['score']:.3f} ± {row['ci']:.3f}", "sinusoid 5-shot"
        meta = meta.replace("pre-training (this run)", f"{pretrain_min:.1f} min pre-training (this run)")
        lines.append(f"| {name} | {label} | {score} | {meta} | {1e3 * row['adapt_s']:.1f} ms | "
                     f"{row['peak_mb']:.1f} MB | {1e3 * row['infer_s']:.2f} ms |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
