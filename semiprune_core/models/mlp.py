"""A two-layer perceptron on flattened pixels: fast enough for unit tests and smoke runs."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Classifier
from .registry import register_model


class MLP(Classifier):
    """flatten -> Linear(hidden) -> ReLU -> Linear(hidden) -> ReLU -> head. ``features(x)``: (B, hidden)."""

    def __init__(self, *, in_features: int, num_classes: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True)
        )
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


@register_model("mlp")
def mlp(*, in_channels: int, num_classes: int, image_size: int, hidden: int = 128) -> MLP:
    return MLP(in_features=in_channels * image_size * image_size, num_classes=num_classes, hidden=hidden)
