"""The architecture of a coordinatewise LSTM optimizer: one frozen dataclass, saved beside every net's weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LSTMConfig", "INPUTS", "OUTPUTS", "BACKENDS"]

INPUTS = ("paper", "normalized")
OUTPUTS = ("linear", "adam")
# where the step's math runs (LSTMRule, LearnedOptimizer, MetaTrainConfig):
#   "auto": the C kernel wherever it applies and builds, torch ops elsewhere (under autograd with hand-written
#           backward nodes); "kernel": as "auto", but a step without autograd that the kernel cannot run is an
#           error; "torch": torch ops only, with the hand-written backward nodes; "reference": torch ops recorded
#           op by op by autograd, the one reference definition that every other backend is tested against
BACKENDS = ("auto", "kernel", "torch", "reference")
_DEFAULT_OUTPUT_SCALE = {"linear": 0.1, "adam": 1e-3}  # the paper's scale; Adam's usual learning rate


@dataclass(frozen=True)
class LSTMConfig:
    """Architecture of a :class:`~learnedopt.CoordinatewiseLSTM`; saved beside the weights so a file rebuilds its net.

    The defaults are the paper's net. ``momentum_decays`` and ``rms_decay`` define the running moments that
    ``inputs="normalized"`` and ``output="adam"`` use; the first momentum decay is the nominal Adam step's
    ``beta1``. ``output_scale=0`` takes the output map's own scale: 0.1 for ``"linear"`` (the paper's), 1e-3
    for ``"adam"`` (the nominal Adam step's learning rate).

    Example:
        >>> LSTMConfig(inputs="normalized", output="adam").output_scale
        0.001
    """

    hidden_size: int = field(default=20, metadata={"help": "LSTM units per layer"})
    num_layers: int = field(default=2, metadata={"help": "LSTM layers"})
    preprocess_p: float = 10.0
    output_scale: float = field(default=0.0, metadata={"help": "update scale (0: 0.1 for linear, 1e-3 for adam, the "
                                                       "nominal Adam learning rate)"})
    inputs: str = field(default="paper", metadata={"help": "LSTM inputs: the paper's (log|g|, sign g) or gradient "
                                                   "and momenta over their RMS", "choices": INPUTS})
    output: str = field(default="linear", metadata={"help": "update map: the paper's unbounded linear head, or a "
                                                    "bounded modulation of Adam's step", "choices": OUTPUTS})
    momentum_decays: tuple[float, ...] = (0.9, 0.5, 0.99)
    rms_decay: float = 0.999
    magnitude_range: float = 100.0

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError(f"hidden_size and num_layers must be >= 1, got {self}")
        if self.inputs not in INPUTS or self.output not in OUTPUTS:
            raise ValueError(f"inputs must be one of {INPUTS} and output one of {OUTPUTS}, got {self}")
        object.__setattr__(self, "momentum_decays", tuple(self.momentum_decays))
        decays = (*self.momentum_decays, self.rms_decay)
        if not self.momentum_decays or not all(0.0 <= d < 1.0 for d in decays):
            raise ValueError(f"momentum_decays (at least one) and rms_decay must lie in [0, 1), got {self}")
        if not self.magnitude_range >= 1.0:
            raise ValueError(f"magnitude_range must be >= 1, got {self.magnitude_range}")
        if self.output_scale == 0:
            object.__setattr__(self, "output_scale", _DEFAULT_OUTPUT_SCALE[self.output])
        elif not self.output_scale > 0:
            raise ValueError(f"output_scale must be > 0 (0: the output map's default), got {self.output_scale}")

    @property
    def input_size(self) -> int:
        return 2 if self.inputs == "paper" else 1 + len(self.momentum_decays)

    @property
    def uses_moments(self) -> bool:
        """Whether the rule keeps running moments of the gradient in its state."""
        return self.inputs == "normalized" or self.output == "adam"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LSTMConfig":
        """Rebuild from :func:`dataclasses.asdict` output (sequences back to tuples)."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fields)


def check_backend(backend: str) -> None:
    """Refuse a backend name that is not one of :data:`BACKENDS`, in one line that lists them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
