"""MAML and ProtoNet on learnedopt's unroll engine, with their training runs and checkpoints.

Example:
    >>> from learnedopt_experiments.baselines import FewShotConfig, load_checkpoint
    >>> model, config, inner_net = load_checkpoint("results/checkpoints/maml-sinusoid-5shot.pt")
    >>> config.algorithm, config.dataset, inner_net is None
    ('maml', 'sinusoid', True)
"""

from .train import FewShotConfig, evaluate, load_checkpoint, train

__all__ = ["FewShotConfig", "evaluate", "load_checkpoint", "train"]
