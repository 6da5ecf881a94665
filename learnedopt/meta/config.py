"""Everything that defines a meta-training run, with every default, help line and resume rule in one place:
``learnedopt meta-train``'s flags are generated from these fields (``learnedopt_cli``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..lstm import BACKENDS, LSTMConfig
from .estimators import ESTIMATORS

__all__ = ["MetaTrainConfig", "DEFAULT_NET", "setting"]


def setting(default: Any, help: str, *, match: bool = False, flag: str | None = None, metavar: str | None = None,
            choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its command-line help; ``match``: a resumed run must have the saved value; ``flag``:
    the command-line name where it differs from the field's."""
    metadata = {"help": help, "match": match, "flag": flag, "metavar": metavar, "choices": choices}
    if isinstance(default, dict):  # a sub-config's arguments
        return field(default_factory=lambda: LSTMConfig(**default), metadata=metadata)
    return field(default=default, metadata=metadata)


# the net meta-training builds unless told otherwise: normalized inputs, the bounded Adam-modulating output, and
# LSTMConfig's defaults for everything else
DEFAULT_NET: dict[str, Any] = {"inputs": "normalized", "output": "adam"}


@dataclass
class MetaTrainConfig:
    """Everything that defines a meta-training run (saved in every checkpoint; ``net`` is the LSTM's architecture).

    Example:
        >>> MetaTrainConfig(iterations=10).net.output_scale
        0.001
    """

    task: str = setting("", "the family's label, saved and checked on resume ('': the family's name)", match=True)
    iterations: int = setting(300, "meta-iterations (each: one horizon)")
    horizon: int = setting(100, "optimization steps per sampled task batch", match=True)
    unroll: int = setting(20, "truncation length: steps per meta-update", match=True)
    meta_batch: int = setting(0, "tasks per meta-iteration (0: the task's default)", match=True)
    meta_lr: float = setting(3e-3, "Adam learning rate of the meta-optimizer")
    clip: float = setting(1.0, "meta-gradient norm clip")
    objective: str = setting("log", "meta-loss: the paper's sum of losses, or the sum of log-losses", match=True,
                             choices=("sum", "log"))
    net: LSTMConfig = setting(DEFAULT_NET, "the LSTM's architecture", match=True)
    curriculum: tuple[int, ...] = setting((), "later training horizons, entered when held-out scores stop improving "
                                          "(Chen et al. 2020)", match=True, metavar="H2,H3,...")
    patience: int = setting(2, "evaluations without improvement before the curriculum moves on")
    rescale: float = setting(0.0, "random objective rescaling f(c*theta), log c ~ U(-R, R) per coordinate "
                             "(Lv et al. 2017)", match=True, metavar="R")
    imitation: int = setting(0, "warm start: N iterations fitting the LSTM's steps to tuned Adam's (Chen et al. "
                             "2020)", match=True, metavar="N")
    eval_every: int = setting(25, "held-out evaluation period (iterations)")
    eval_tasks: int = setting(0, "held-out tasks per evaluation (0: the task's default)")
    eval_lengths: tuple[int, ...] = setting((), "run lengths scored on held-out tasks (default: horizon, 2x "
                                            "horizon, last curriculum horizon)", metavar="L1,L2,...")
    checkpoint_every: int = setting(25, "checkpoint period (iterations)")
    seed: int = setting(0, "seed of every random choice of the run", match=True)
    device: str = setting("cpu", "cpu, cuda, cuda:1, ...")
    init_net: str | None = setting(None, "start from this net (packaged name, net.pt or run folder); it is scored "
                                   "first, so net.pt is never worse on held-out tasks than the start")
    estimator: str = setting("tbptt", "meta-gradient: truncated backprop, antithetic ES, or persistent ES "
                             "(unbiased)", match=True, choices=tuple(ESTIMATORS))
    es_pairs: int = setting(8, "antithetic pairs per truncation (es, pes)")
    es_sigma: float = setting(0.01, "perturbation standard deviation (es, pes)")
    second_order: bool = setting(False, "tbptt: differentiate through the optimizee's gradients too (the exact "
                                 "meta-gradient of each truncation, at a higher cost)", match=True)
    checkpoint: int = setting(0, "tbptt: recompute K-step segments in backward instead of storing them (saves "
                              "memory)", flag="checkpoint-segment", metavar="K")
    max_skipped: int = setting(20, "stop once N meta-steps in a row had non-finite meta-gradients (each is "
                               "skipped)", metavar="N")
    backend: str = setting("auto", "where the LSTM's math runs (see learnedopt.lstm.BACKENDS)", choices=BACKENDS)

    def __post_init__(self) -> None:
        self.curriculum = tuple(self.curriculum)
        self.eval_lengths = tuple(self.eval_lengths)
        if isinstance(self.net, dict):  # as asdict() saves it
            self.net = LSTMConfig.from_dict(self.net)
        for horizon in (self.horizon, *self.curriculum):
            if horizon % self.unroll:
                raise ValueError(f"horizon ({horizon}) must be a multiple of unroll ({self.unroll})")
        if self.rescale < 0 or self.imitation < 0 or self.patience < 1:
            raise ValueError("rescale and imitation must be >= 0 and patience >= 1")
        if self.checkpoint < 0:
            raise ValueError(f"checkpoint must be >= 0 (0: store every step), got {self.checkpoint}")
        if self.es_pairs < 1 or not self.es_sigma > 0:
            raise ValueError(f"es_pairs must be >= 1 and es_sigma > 0, got {self.es_pairs} and {self.es_sigma}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        for name in ("iterations", "horizon", "unroll", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("meta_batch", "eval_tasks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: the task's default), got {getattr(self, name)}")

    @staticmethod
    def must_match() -> tuple[str, ...]:
        """The fields a resumed run must share with the checkpoint it continues."""
        return tuple(f.name for f in fields(MetaTrainConfig) if f.metadata.get("match"))
