"""Command-level workflows behind ``learnedopt demo`` and ``learnedopt benchmark``: run, then write reports."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from learnedopt import LSTMConfig, MetaTrainConfig, MetaTrainer
from learnedopt.meta.evaluation import TEST_SEED, TUNE_SEED

from .evaluate import Curves, compare
from .tasks import QuadraticFamily, get_family

__all__ = ["benchmark", "demo", "hardware"]


def hardware() -> str:
    """A one-line description of where a number was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = os.cpu_count()
    return (
        f"{cpu} ({cores} cores), {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}"
    )


def _write(curves: Curves, out: Path, name: str, reference: str = "Adam") -> str:
    curves.save_json(out / f"{name}.json")
    curves.plot(out / f"{name}.png")
    table = curves.markdown(reference)
    command = curves.meta.get("command", "")
    (out / f"{name}.md").write_text(
        f"# {curves.title}\n\nCommand: `{command}`\n\nHardware: {curves.meta.get('hardware', '')}\n\n"
        f"Final loss: {curves.meta.get('final_loss', 'the loss at the last step')} (also what tuned the baselines' "
        f"learning rates).\n\n{table}\n\n"
        f"![loss curves]({name}.png)\n"
    )
    return table


def benchmark(
    task: str,
    nets: list[str],
    steps: int,
    num_tasks: int,
    baselines: list[str],
    out: Path,
    name: str,
    command: str,
    plot_only: bool = False,
    data_dir: str | None = None,
    device: str = "cpu",
    split: str = "test",
    state_dtypes: Sequence[torch.dtype] = (torch.float32,),
) -> str:
    """Compare nets with tuned baselines on ``num_tasks`` held-out tasks; write ``name``.{md,json,png}.

    ``split="tune"`` reports on the tuning tasks instead of the test tasks: use it to choose between nets
    without ever looking at the numbers you will report.
    """
    out.mkdir(parents=True, exist_ok=True)
    if plot_only:
        path = out / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"--plot-only needs {path}; run the benchmark once without --plot-only first")
        return _write(Curves.load_json(path), out, name)
    family = get_family(task, data_dir, device)
    if split not in ("test", "tune"):
        raise ValueError(f"split must be 'test' or 'tune', got {split!r}")
    eval_seed = TEST_SEED if split == "test" else TUNE_SEED
    tune_task = family.sample(max(family.default_eval_tasks, num_tasks // 4), torch.Generator().manual_seed(TUNE_SEED))
    eval_task = family.sample(num_tasks, torch.Generator().manual_seed(eval_seed))
    title = f"{task}: {num_tasks} {'held-out' if split == 'test' else 'tuning'} tasks, {steps} steps"
    started = time.perf_counter()
    curves = compare(tune_task, eval_task, {n: n for n in nets}, baselines, steps, title, eval_seed, state_dtypes)
    scored = (
        "loss of the final parameters on a fixed 10,000-image subset of the training set"
        if hasattr(eval_task, "eval_loss") else "the objective at the last step"
    )
    curves.meta.update(
        command=command, hardware=hardware(), seconds=round(time.perf_counter() - started, 1), final_loss=scored
    )
    _log_tensorboard(curves, out / "tb" / name)
    return _write(curves, out, name)


def _log_tensorboard(curves: Curves, logdir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for opt_name, quartiles in curves.quartiles.items():
            for step, value in enumerate(quartiles[1].tolist()):
                writer.add_scalar(f"median_loss/{opt_name}", value, step)


def demo(out: Path, iterations: int, seed: int, progress: bool, command: str) -> str:
    """Meta-train a quadratic optimizer briefly, then compare it with tuned Adam and SGD on held-out tasks."""
    started = time.perf_counter()
    config = MetaTrainConfig(  # the paper's net and meta-loss, as in its quadratic experiment
        task="quadratic", iterations=iterations, objective="sum", seed=seed, eval_every=20, net=LSTMConfig(),
    )
    family = QuadraticFamily()
    MetaTrainer(family, config, out / "run", progress=progress).train()
    trained = time.perf_counter() - started
    tune_task = family.sample(256, torch.Generator().manual_seed(TUNE_SEED))
    test_task = family.sample(1000, torch.Generator().manual_seed(TEST_SEED))
    curves = compare(
        tune_task,
        test_task,
        {"LSTM (this demo)": str(out / "run" / "net.pt")},
        ["Adam", "SGD"],
        100,
        "Held-out 10-d quadratics (1000 tasks)",
    )
    curves.meta.update(command=command, hardware=hardware(), meta_train_seconds=round(trained, 1))
    table = _write(curves, out, "demo")
    (out / "summary.json").write_text(json.dumps(curves.summary(), indent=2))
    return table
