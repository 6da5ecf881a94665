"""Reports of update-rule comparisons: loss curves over held-out tasks, tables and plots.

Every optimizer is run through the same unroll engine (:mod:`learnedopt.meta.evaluation`) on the same tasks, initial
parameters and batches, so the only difference between two curves is the update rule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from learnedopt import LSTMRule, UpdateRule, load_net
from learnedopt.meta.evaluation import BASELINES, TEST_SEED, final_losses, run_rule, tune_lr
from learnedopt.meta.tasks import Task

__all__ = ["Curves", "compare"]


@dataclass
class Curves:
    """Loss curves of several optimizers on the same test tasks, kept compactly enough to commit.

    Per optimizer: the per-step quartiles over tasks (for the plot) and every task's final loss (for the table).
    """

    title: str
    steps: int
    quartiles: dict[str, Tensor] = field(default_factory=dict)  # name -> (3, steps + 1): 25%, 50%, 75%
    finals: dict[str, Tensor] = field(default_factory=dict)  # name -> (num_tasks,) final losses
    lrs: dict[str, float | None] = field(default_factory=dict)
    accuracy: dict[str, Tensor] = field(default_factory=dict)  # name -> (num_tasks,) test accuracy at the end
    meta: dict[str, object] = field(default_factory=dict)

    def add(
        self, name: str, losses: Tensor, lr: float | None = None, accuracy: Tensor | None = None,
        final: Tensor | None = None,
    ) -> None:
        """Record an optimizer's ``(steps + 1, num_tasks)`` minibatch losses (for the curves) and its final
        losses (default: the last step's; see :func:`final_losses`); diverged values count as +Inf."""
        clean = torch.nan_to_num(losses.detach().double().cpu(), nan=math.inf)
        levels = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        self.quartiles[name] = torch.quantile(clean.clamp_max(1e30), levels, dim=1)
        self.finals[name] = clean[-1] if final is None else final.double().cpu()
        self.lrs[name] = lr
        if accuracy is not None:
            self.accuracy[name] = accuracy.double().cpu()

    def summary(self, reference: str = "Adam") -> list[dict[str, Any]]:
        """One row per optimizer: final-loss statistics and ratios to ``reference``."""
        finals = self.finals
        ref = finals.get(reference)
        rows = []
        for name, final in finals.items():
            row: dict[str, Any] = {
                "optimizer": name,
                "lr": self.lrs.get(name),
                "median": float(final.median()),
                "mean": float(final.mean()),
                "std": float(final.std()),
                "geomean": float(final.clamp_min(1e-30).log().mean().exp()),
                "diverged": int((~torch.isfinite(final)).sum()),
            }
            if name in self.accuracy:
                row["test_accuracy"] = float(self.accuracy[name].double().mean())
            if ref is not None:
                row["median_ratio"] = row["median"] / float(ref.median())
                row["geomean_ratio"] = row["geomean"] / float(ref.clamp_min(1e-30).log().mean().exp())
                row["mean_ratio"] = row["mean"] / float(ref.mean())
            rows.append(row)
        return rows

    def markdown(self, reference: str = "Adam") -> str:
        """A markdown table of :meth:`summary`."""
        acc = bool(self.accuracy)
        head = (
            f"| optimizer | lr | median final loss | mean ± std | geo-mean | median / {reference} "
            f"| geo-mean / {reference} | mean / {reference} |" + (" test accuracy |" if acc else "")
        )
        lines = [head, "|---" * (9 if acc else 8) + "|"]
        for r in self.summary(reference):
            lr = "—" if r["lr"] is None else f"{r['lr']:.3g}"
            lines.append(
                f"| {r['optimizer']} | {lr} | {r['median']:.3g} | {r['mean']:.3g} ± {r['std']:.2g} "
                f"| {r['geomean']:.3g} | {r.get('median_ratio', float('nan')):.3f} "
                f"| {r.get('geomean_ratio', float('nan')):.3f} | {r.get('mean_ratio', float('nan')):.3f} |"
                + (f" {100 * r['test_accuracy']:.2f}% |" if acc else "")
            )
        return "\n".join(lines)

    def save_json(self, path: Path) -> None:
        payload = {
            "title": self.title,
            "steps": self.steps,
            "lrs": self.lrs,
            "meta": self.meta,
            "quartiles": {k: _rounded(v) for k, v in self.quartiles.items()},
            "finals": {k: _rounded(v) for k, v in self.finals.items()},
            "accuracy": {k: _rounded(v) for k, v in self.accuracy.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))

    @classmethod
    def load_json(cls, path: Path) -> "Curves":
        payload = json.loads(Path(path).read_text())
        def tensors(key: str) -> dict[str, Tensor]:
            return {k: torch.tensor(v, dtype=torch.float64) for k, v in payload.get(key, {}).items()}

        return cls(
            payload["title"], payload["steps"], tensors("quartiles"), tensors("finals"), payload["lrs"],
            tensors("accuracy"), payload.get("meta", {}),
        )

    def plot(self, path: Path) -> None:
        """Median loss per step with an interquartile band, log-scale y."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        steps = torch.arange(self.steps + 1)
        for name, q in self.quartiles.items():
            lr = self.lrs.get(name)
            label = name if lr is None else f"{name} (lr={lr:.2g})"
            (line,) = ax.plot(steps, q[1], label=label, lw=2 if lr is None else 1.3)
            ax.fill_between(steps, q[0], q[2], color=line.get_color(), alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (median, IQR band)")
        ax.set_title(self.title)
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _rounded(values: Tensor) -> list:
    """Values with 5 significant digits: enough for tables and plots, small enough to commit."""
    if values.dim() > 1:
        return [_rounded(row) for row in values]
    return [float(f"{x:.5g}") for x in values.tolist()]


def compare(
    tune_task: Task,
    test_task: Task,
    nets: dict[str, str | Path],
    baselines: list[str],
    steps: int,
    title: str,
    eval_seed: int = TEST_SEED,
    state_dtypes: Sequence[torch.dtype] = (torch.float32,),
) -> Curves:
    """Tune each baseline's lr on ``tune_task``, then run every net and baseline on ``test_task``.

    ``eval_seed`` draws the initial parameters on ``test_task``. Where the task can score test accuracy
    (``test_task.test_accuracy(params)``), it is recorded too. Each net runs once per hidden-state dtype in
    ``state_dtypes``; rows other than float32 are labelled with their dtype.
    """
    curves = Curves(title, steps)
    tuning: dict[str, dict[float, float]] = {}
    rules: dict[str, UpdateRule] = {}
    lrs: dict[str, float | None] = {}
    for name, source in nets.items():
        net = load_net(source).to(test_task.device)
        for dtype in state_dtypes:
            label = name if dtype == torch.float32 else f"{name} ({str(dtype).removeprefix('torch.')} state)"
            rules[label], lrs[label] = LSTMRule(net, state_dtype=dtype), None
    for name in baselines:
        make = BASELINES[name]
        lr, tuning[name] = tune_lr(tune_task, make, steps)
        rules[name], lrs[name] = make(lr), lr
    for name, rule in rules.items():
        result = run_rule(test_task, rule, steps, eval_seed)
        accuracy = test_task.test_accuracy(result.params) if hasattr(test_task, "test_accuracy") else None
        curves.add(name, result.losses, lrs[name], accuracy, final=final_losses(test_task, result))
    curves.meta["tuning_scores"] = {k: {f"{lr:.3g}": s for lr, s in v.items()} for k, v in tuning.items()}
    return curves
