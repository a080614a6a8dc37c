"""A registry of models by name (timm style): ``create_model("fastcnn", in_channels=1, num_classes=10, image_size=28)``.

A factory registered with :func:`register_model` takes keyword-only ``in_channels``, ``num_classes``,
``image_size`` and any model-specific options, and returns an :class:`~semiprune_core.models.base.Classifier`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..seeding import stream_seed

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model factory under ``name`` (names are unique)."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    seed: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build model ``name`` for (B, in_channels, image_size, image_size) float input -> (B, num_classes) logits.

    With ``seed`` the initial weights come from the seed stream ``(seed, "model_init")`` and the
    global torch RNG is left untouched; without it they come from the global RNG.
    """
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}", f"choose one of: {', '.join(list_models())}")
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"model {key} must be a positive integer, got {value!r}", "fix the model config")
    factory = _MODELS[name]
    if seed is None:
        return factory(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "model_init"))
        return factory(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
