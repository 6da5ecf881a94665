"""The meta-training library, built on the engine (:mod:`learnedopt.rules`, :mod:`learnedopt.lstm`,
:mod:`learnedopt.unroll`): task families (:mod:`.tasks`), meta-gradient estimators (:mod:`.estimators`), held-out
evaluation against tuned baselines (:mod:`.evaluation`), the imitation warm start (:mod:`.imitation`),
multi-process helpers (:mod:`.distributed`), the resumable run loop (:mod:`.runs`) and the trainer
(:mod:`.config`, :mod:`.selection`, :mod:`.trainer`). The engine never imports this package."""

from .config import MetaTrainConfig
from .estimators import ESTIMATORS, AntitheticES, GradientEstimator, PersistentES, TruncatedBackprop
from .tasks import Mixture, ModuleFamily, RescaledTask, Task, TaskFamily
from .trainer import MetaTrainer, meta_train

__all__ = ["ESTIMATORS", "AntitheticES", "GradientEstimator", "MetaTrainConfig", "MetaTrainer", "Mixture",
           "ModuleFamily", "PersistentES", "RescaledTask", "Task", "TaskFamily", "TruncatedBackprop", "meta_train"]
