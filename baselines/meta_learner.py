"""The meta-learner LSTM of Ravi & Larochelle (2017), "Optimization as a model for few-shot learning".

The learner's parameters are the cell state of an LSTM: ``theta_t = f_t * theta_{t-1} - i_t * grad_t`` (the
candidate cell state is the negative gradient), with input and forget gates that are learned functions of the
gradient, the loss, the parameter and the previous gate, shared across coordinates (Section 3.2):

    i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I),    f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F)

where ``h_t`` is the output of a first, ordinary coordinatewise LSTM over the preprocessed gradient and loss
(Andrychowicz et al.'s log/sign map of each, Section 3.3 and their code). The gate biases start so that
``f ~ 1`` and ``i`` is small (their initialization); the learner's initial parameters are meta-learned too (the
caller puts the model's parameters in the meta-optimizer). Meta-training uses their first-order approximation:
the gradient and the loss enter the meta-learner as inputs, not differentiated through
(:func:`learnedopt.unroll` with ``second_order=False``), and BatchNorm uses batch statistics in training and
testing (Conv-4 here always does).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from learnedopt import preprocess_gradient
from learnedopt.rules import RuleState

__all__ = ["MetaLearnerLSTM", "MetaLearnerRule"]


class MetaLearnerLSTM(nn.Module):
    """The meta-learner's weights: the first LSTM (4 inputs: preprocessed gradient and loss) and the two gates."""

    def __init__(self, hidden_size: int = 20) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(4, hidden_size)
        self.input_gate = nn.Linear(hidden_size + 2, 1)
        self.forget_gate = nn.Linear(hidden_size + 2, 1)
        for gate, low, high in ((self.input_gate, -5.0, -4.0), (self.forget_gate, 4.0, 6.0)):
            nn.init.uniform_(gate.weight, -0.01, 0.01)
            nn.init.uniform_(gate.bias, low, high)


class MetaLearnerRule:
    """:class:`MetaLearnerLSTM` as an update rule (``takes_loss``: the unroll engine hands it each step's loss).

    Example:
        >>> rule = MetaLearnerRule(MetaLearnerLSTM())
        >>> params = [torch.ones(3)]
        >>> updates, state = rule.update([torch.ones(3)], rule.init(params), params, loss=torch.tensor(2.0))
        >>> bool((updates[0] < 0).all() and (updates[0] > -0.1).all())  # f ~ 1, i small: a small step down
        True
    """

    takes_loss = True

    def __init__(self, net: MetaLearnerLSTM) -> None:
        self.net = net

    def init(self, params: Sequence[Tensor]) -> RuleState:
        hidden = self.net.lstm.hidden_size
        weight = self.net.input_gate.weight
        state = []
        for p in params:
            n = p.numel()
            zeros = torch.zeros(n, hidden, dtype=weight.dtype, device=p.device)
            state.append({"h": zeros, "c": zeros.clone(), "i": torch.zeros(n, dtype=weight.dtype, device=p.device),
                          "f": torch.ones(n, dtype=weight.dtype, device=p.device)})
        return state

    def update(
        self, grads: Sequence[Tensor], state: RuleState, params: Sequence[Tensor], *, inplace: bool = False,
        loss: Tensor | None = None,
    ) -> tuple[list[Tensor], RuleState]:
        """``theta_t - theta_{t-1} = (f_t - 1) theta_{t-1} - i_t grad_t`` per coordinate; ``loss`` is the step's
        loss (a scalar, or one per task for task-batched parameters whose first dimension is the task)."""
        if loss is None:
            raise ValueError("the meta-learner LSTM needs each step's loss: run it through learnedopt.unroll")
        updates, new_state = [], []
        for g, s, p in zip(grads, state, params):
            theta, grad = p.reshape(-1), g.reshape(-1)
            features = torch.cat((preprocess_gradient(grad), preprocess_gradient(_per_coordinate(loss, p))), dim=1)
            h, c = self.net.lstm(features, (s["h"], s["c"]))
            i = torch.sigmoid(self.net.input_gate(torch.cat((h, theta[:, None], s["i"][:, None]), 1)))[:, 0]
            f = torch.sigmoid(self.net.forget_gate(torch.cat((h, theta[:, None], s["f"][:, None]), 1)))[:, 0]
            updates.append(((f - 1) * theta - i * grad).reshape(p.shape))
            new_state.append({"h": h, "c": c, "i": i, "f": f})
        return updates, new_state


def _per_coordinate(loss: Tensor, p: Tensor) -> Tensor:
    """``loss`` broadcast to every coordinate of ``p``: one value for all, or task ``k``'s loss for the
    coordinates of ``p[k]``."""
    loss = loss.detach()
    if loss.numel() == 1:
        return loss.reshape(1).expand(p.numel())
    if p.shape[0] != loss.numel():
        raise ValueError(f"{loss.numel()} losses for a parameter whose first dimension is {p.shape[0]}")
    return loss.reshape(-1, 1).expand(loss.numel(), p.numel() // loss.numel()).reshape(-1)

