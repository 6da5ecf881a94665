"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016), as a net and as an update rule.

One small LSTM is applied to every coordinate of every parameter as a batch: the weights are shared, the hidden
state is per coordinate. :class:`learnedopt.LearnedOptimizer` and the unroll engine both call :class:`LSTMRule`.
The torch ops of this package are the one reference definition of the math; on CPUs the rule runs their C twin
(:mod:`learnedopt._kernel`, tested against them: ``tests/test_kernel.py``, ``tests/test_lstm.py``).

Modules, in dependency order: :mod:`.config` (the architecture), :mod:`.features` (inputs), :mod:`.output`
(the bounded output map), :mod:`.cell` (one cell in torch ops), :mod:`.kernel_ops` (the C-kernel step and
autograd node), :mod:`.triton_step` (the step as one Triton kernel on GPUs), :mod:`.net` (the module),
:mod:`.chunks` (the flat batch), :mod:`.rule` (the update rule).

Two input sets and two output maps are selectable in :class:`LSTMConfig` and saved with every net:

* ``inputs="paper"``: the paper's ``(log|g|/p, sign g)`` (Appendix A). ``inputs="normalized"``: the gradient
  and its momenta at several decays, each divided by the running RMS of the gradient (RNNprop, Lv et al. 2017;
  multi-timescale momentum, Wichrowska et al. 2017): scale-free, and able to express Adam-like rules.
* ``output="linear"``: the paper's ``output_scale * head(h)``, unbounded. ``output="adam"``: the LSTM modulates a
  nominal Adam step (Harrison et al. 2022): ``-output_scale * (r^tanh(a) * clip(m_hat / sqrt(v_hat), 1) -
  tanh(b))`` for the head's two outputs ``(a, b)`` and ``r = magnitude_range``. Its size is bounded by
  construction, ``|update| <= lr * output_scale * (magnitude_range + 1)``; a coordinate that has never had a
  nonzero gradient gets an exactly-zero update; and a zero-initialized head is exactly Adam at
  ``lr = output_scale`` (with the nominal step clipped to 1), a safe starting point for meta-training.

Reference: M. Andrychowicz et al., "Learning to learn by gradient descent by gradient descent", NeurIPS 2016
(Section 2.1 for the architecture, Appendix A for the gradient preprocessing).
"""

from .config import BACKENDS, INPUTS, OUTPUTS, LSTMConfig
from .features import largest_gradient, preprocess_gradient
from .net import CoordinatewiseLSTM
from .rule import LSTMRule

__all__ = ["BACKENDS", "INPUTS", "OUTPUTS", "CoordinatewiseLSTM", "LSTMConfig", "LSTMRule", "largest_gradient",
           "preprocess_gradient"]
