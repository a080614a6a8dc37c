"""The interface every registered model follows."""

from __future__ import annotations

from torch import Tensor, nn


class Classifier(nn.Module):
    """``features(x)`` -> (B, num_features) penultimate features; ``forward(x)`` -> (B, num_classes) logits.

    Input ``x`` is float (B, C, H, W), normalised by :func:`semiprune_core.training.engine.to_float`.
    Subclasses set ``self.head`` (an ``nn.Linear``) and implement :meth:`features`.
    """

    head: nn.Linear

    @property
    def num_features(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
