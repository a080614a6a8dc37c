"""One training engine (:func:`fit`) with batched tensor augmentation; see :mod:`.engine` and :mod:`.augment`."""

from .augment import (
    VIEWS,
    apply_view,
    cutout,
    hflip,
    pad_crop,
    randaugment,
    strong_view,
    weak_view,
)
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
    resolve_precision,
    to_float,
)

__all__ = [
    "VIEWS",
    "FitResult",
    "Hook",
    "Objective",
    "Schedule",
    "StepOutput",
    "SupervisedObjective",
    "apply_view",
    "cutout",
    "evaluate",
    "fit",
    "hflip",
    "pad_crop",
    "predict",
    "randaugment",
    "resolve_device",
    "resolve_precision",
    "strong_view",
    "to_float",
    "weak_view",
]
