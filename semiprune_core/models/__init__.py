"""Models by name: ``create_model(name, *, in_channels, num_classes, image_size)``.

Every model is a :class:`Classifier`: float (B, C, H, W) in, (B, num_classes) logits out, and
``features(x)`` -> (B, num_features) penultimate features. This package is the one place that
imports torchvision (through :func:`semiprune_core.compat.import_torchvision`).
"""

from . import fastcnn, mlp, resnet  # noqa: F401  (registers the models)
from .base import Classifier
from .registry import create_model, list_models, register_model

__all__ = ["Classifier", "create_model", "list_models", "register_model"]
