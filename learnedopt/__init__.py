"""learnedopt: learned optimizers and meta-learning in PyTorch.

The engine (update rules :mod:`learnedopt.rules`, the LSTM :mod:`learnedopt.lstm` and its optional C kernel,
the optimizer, the unroll engine, packaged nets) and the meta-training library built on it
(:mod:`learnedopt.meta`: task families, estimators, the trainer, :func:`meta_train`). Nothing here imports the
experiments (:mod:`learnedopt_experiments`) or the command line (:mod:`learnedopt_cli`).

Example:
    >>> import torch, learnedopt
    >>> model = torch.nn.Linear(10, 1)
    >>> opt = learnedopt.LearnedOptimizer(model.parameters())   # packaged weights, no network
    >>> "quadratic-lstm" in learnedopt.list_pretrained()
    True
"""

from .lstm import CoordinatewiseLSTM, LSTMConfig, LSTMRule, preprocess_gradient
from .meta import (
    ESTIMATORS, AntitheticES, GradientEstimator, MetaTrainConfig, MetaTrainer, Mixture, ModuleFamily, PersistentES,
    RescaledTask, Task, TaskFamily, TruncatedBackprop, meta_train,
)
from .optimizer import LearnedOptimizer, RuleOptimizer
from .pretrained import DEFAULT_NET, list_pretrained, load_net, net_info, save_net
from .rules import ParamState, RuleState, UpdateRule, adam, rmsprop, sgd
from .unroll import UnrollResult, default_weights, module_loss, unroll

__version__ = "0.1.0"

__all__ = [
    "AntitheticES",
    "CoordinatewiseLSTM",
    "DEFAULT_NET",
    "ESTIMATORS",
    "GradientEstimator",
    "LSTMConfig",
    "LSTMRule",
    "LearnedOptimizer",
    "MetaTrainConfig",
    "MetaTrainer",
    "Mixture",
    "ModuleFamily",
    "ParamState",
    "PersistentES",
    "RescaledTask",
    "RuleOptimizer",
    "RuleState",
    "Task",
    "TaskFamily",
    "TruncatedBackprop",
    "UnrollResult",
    "UpdateRule",
    "adam",
    "default_weights",
    "list_pretrained",
    "load_net",
    "meta_train",
    "module_loss",
    "net_info",
    "preprocess_gradient",
    "rmsprop",
    "save_net",
    "sgd",
    "unroll",
]
