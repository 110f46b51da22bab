"""The model as it is served: one tensor of every prediction rule's log-probabilities.

``PredictionRules(model)`` wraps a trained model; ``forward(images)`` returns ``(N, R, C)`` float32
log-probabilities, rule ``r`` being ``rules[r]`` ("main" first), so that ``output[:, 0].argmax(1)`` is the
prediction that training logs as ``val/top1/main``. One tensor, not the model's dict of outputs: MLflow's
pyfunc (``mlflow models serve``, ``pyfunc.load_model(...).predict``) takes models with one output.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["PredictionRules"]


class PredictionRules(nn.Module):
    """``model`` with ``model.method.predict`` applied: ``(N, R, C)`` log-probabilities, rules in ``rules``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        with torch.no_grad():  # the rule names, from the method itself
            was_training = model.training
            model.eval()
            first = next(model.parameters())
            probe = torch.zeros(1, 3, 32, 32, dtype=first.dtype, device=first.device)
            names = list(model.method.predict(model(probe)))
            model.train(was_training)
        self.rules: List[str] = ["main"] + [name for name in names if name != "main"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        predicted = self.model.method.predict(self.model(images))
        return torch.stack([predicted[name] for name in self.rules], dim=1)
