"""Output-level ensembles: the reference rows a weight merge is compared with.

Both need every expert at inference time (n forward passes instead of one), which is what
merging avoids. For task *t*, every expert encoder is combined with task *t*'s head (the same
head a merged encoder gets), and:

* :func:`probability_average` averages the softmax probabilities and predicts the argmax;
* :func:`majority_vote` lets each member vote its argmax; ties go to the class with the
  larger summed probability among the tied ones, then to the smaller class index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _stack(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    if not logits:
        raise ValueError("an ensemble needs at least one member")
    shapes = {tuple(x.shape) for x in logits}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree on logits shape: {sorted(shapes)}")
    return torch.stack([x.float() for x in logits])  # [members, n, classes]


def probability_average(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of the members' class probabilities, [n, classes]."""
    return _stack(logits).softmax(-1).mean(0)


def majority_vote(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Predicted class per example [n] by plurality of the members' argmax votes."""
    stacked = _stack(logits)
    members, n, classes = stacked.shape
    votes = torch.zeros(n, classes)
    votes.scatter_add_(1, stacked.argmax(-1).T, torch.ones(n, members))
    prob_sum = stacked.softmax(-1).sum(0)
    top = votes == votes.max(-1, keepdim=True).values
    # among tied classes: larger summed probability wins; argmax takes the first on exact ties
    return torch.where(top, prob_sum, torch.full_like(prob_sum, -1.0)).argmax(-1)
