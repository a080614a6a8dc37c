"""One training engine (:func:`fit`) with batched tensor augmentation; see :mod:`.engine` and :mod:`.augment`."""

from .augment import VIEWS, apply_view, cutout, hflip, pad_crop, randaugment, strong_view, weak_view
from .engine import (
    FitResult,
    Hook,
    Objective,
    Schedule,
    StepOutput,
    SupervisedObjective,
    evaluate,
    fit,
    predict,
    resolve_device,
    to_float,
)

__all__ = [
    "VIEWS", "apply_view", "cutout", "hflip", "pad_crop", "randaugment", "strong_view", "weak_view",
    "FitResult", "Hook", "Objective", "Schedule", "StepOutput", "SupervisedObjective",
    "evaluate", "fit", "predict", "resolve_device", "to_float",
]
