"""The experiments built on :mod:`learnedopt`: the meta-training task families and reports
(:mod:`learnedopt_experiments.meta_train`, folder ``meta_train/``), MAML and ProtoNet
(:mod:`learnedopt_experiments.baselines`, folder ``baselines/``), and the data-root convention they share
(:mod:`learnedopt_experiments.data`). Installed under this namespace so that no top-level name collides with a
published package; :mod:`learnedopt` never imports it."""
