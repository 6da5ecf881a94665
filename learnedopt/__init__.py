"""learnedopt: learned optimizers and meta-learning in PyTorch.

Example:
    >>> import torch, learnedopt
    >>> model = torch.nn.Linear(10, 1)
    >>> opt = learnedopt.LearnedOptimizer(model.parameters())   # packaged weights, no network
    >>> "quadratic-lstm" in learnedopt.list_pretrained()
    True
"""

from .estimators import ESTIMATORS, AntitheticES, GradientEstimator, PersistentES, TruncatedBackprop
from .lstm import CoordinatewiseLSTM, LSTMConfig, LSTMRule, preprocess_gradient
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
    "ParamState",
    "PersistentES",
    "RuleOptimizer",
    "RuleState",
    "TruncatedBackprop",
    "UnrollResult",
    "UpdateRule",
    "adam",
    "default_weights",
    "list_pretrained",
    "load_net",
    "module_loss",
    "net_info",
    "preprocess_gradient",
    "rmsprop",
    "save_net",
    "sgd",
    "unroll",
]
