"""Saving a trained model as an artifact: its registry spec plus a plain state dict.

Loaded with ``torch.load(weights_only=True)``: a model file can hold tensors and plain values only,
never code. The spec (name, channels, classes, size) lets a stage that did not train the model
rebuild it without reading the trainer's params.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import DataError
from ..io import atomic_path
from .registry import create_model

FORMAT = 1


@dataclass(frozen=True)
class ModelSpec:
    name: str
    in_channels: int
    num_classes: int
    image_size: int

    def build(self) -> nn.Module:
        return create_model(self.name, in_channels=self.in_channels, num_classes=self.num_classes, image_size=self.image_size)


def save_model(path: str | os.PathLike, model: nn.Module, spec: ModelSpec) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Saved through a file object: given a path, torch.save names the archive's inner folder after
    # the (random, temporary) file name, and identical weights would give different bytes.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, "spec": asdict(spec), "state_dict": state}, fh)


def load_model(path: str | os.PathLike, *, stage: str = "its stage") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the saved model (eval mode, CPU)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist", f"run {stage} first (dvc repro)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        spec = ModelSpec(**saved["spec"])
        model = spec.build()
        model.load_state_dict(saved["state_dict"])
    except Exception as err:  # unreadable file, foreign layout, wrong shapes
        raise DataError(f"{path} is not a usable semiprune model ({type(err).__name__})", f"delete it and re-run {stage}") from None
    return model.eval(), spec
