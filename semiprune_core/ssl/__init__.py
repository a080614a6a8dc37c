"""Semi-supervised pseudo-labeling: FixMatch-family objectives and pseudo-label tables."""

from .objective import (
    FixedThreshold,
    FlexMatchThreshold,
    FreeMatchThreshold,
    SemiSupervisedObjective,
    ThresholdPolicy,
    make_policy,
)
from .pseudo_labels import HUMAN, PSEUDO, accuracy_report, pseudo_labels

__all__ = [
    "FixedThreshold", "FlexMatchThreshold", "FreeMatchThreshold", "HUMAN", "PSEUDO", "SemiSupervisedObjective",
    "ThresholdPolicy", "accuracy_report", "make_policy", "pseudo_labels",
]
