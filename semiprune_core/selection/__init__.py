"""Coreset selection: (scores, targets, ratio, strategy) -> kept mask + reason per sample."""

from .select import EASIER_IS_HIGHER, Selection, budget, class_quotas, hardness, select
from .strategies import REASONS, STRATEGIES, Picked, kmeans

__all__ = ["EASIER_IS_HIGHER", "REASONS", "STRATEGIES", "Picked", "Selection", "budget", "class_quotas",
           "hardness", "kmeans", "select"]
