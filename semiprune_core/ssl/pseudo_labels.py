"""From class probabilities to the target label every later stage trains and scores against.

Pure numpy. Human labels always win over pseudo-labels.
"""

from __future__ import annotations

import numpy as np

from ..data.pool import UNLABELED

HUMAN, PSEUDO = "human", "pseudo"
CONFIDENCE_BUCKETS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0 + 1e-9)


def pseudo_labels(probs: np.ndarray, *, human_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Pseudo-label every sample and pick its target.

    Args:
      probs: (N, C) float, softmax outputs of the labeling model on un-augmented samples.
      human_labels: (N,) int, the human label or ``UNLABELED`` (-1).

    Returns arrays of shape (N,): ``pseudo_label`` (argmax), ``confidence`` (its probability),
    ``margin`` (top-1 minus top-2 probability), ``entropy`` (nats), ``target`` (human label where
    one exists, else the pseudo-label) and ``label_source`` ("human" / "pseudo").
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(human_labels):
        raise ValueError(f"probs must be (N, C) aligned with human_labels; got {probs.shape} and {len(human_labels)}")
    top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.concatenate([np.zeros_like(probs), probs], 1)
    pseudo = probs.argmax(axis=1)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
    human = np.asarray(human_labels) != UNLABELED
    return {
        "pseudo_label": pseudo.astype(np.int64),
        "confidence": top2[:, 1],
        "margin": top2[:, 1] - top2[:, 0],
        "entropy": entropy,
        "target": np.where(human, human_labels, pseudo).astype(np.int64),
        "label_source": np.where(human, HUMAN, PSEUDO),
    }


def accuracy_report(
    pseudo_label: np.ndarray, confidence: np.ndarray, true_labels: np.ndarray, *, num_classes: int,
    buckets: tuple[float, ...] = CONFIDENCE_BUCKETS,
) -> dict:
    """Pseudo-label accuracy against hidden true labels: overall, per class, per confidence bucket.

    For reports only (benchmarks with hidden labels); nothing the pipeline decides may read it.
    Shapes: all (M,) over the samples to judge (typically the unlabeled pool).
    """
    correct = pseudo_label == true_labels
    per_class = {}
    for c in range(num_classes):
        sel = true_labels == c
        per_class[str(c)] = {"n": int(sel.sum()), "accuracy": float(correct[sel].mean()) if sel.any() else None}
    by_bucket = []
    for lo, hi in zip(buckets[:-1], buckets[1:]):
        sel = (confidence >= lo) & (confidence < hi)
        by_bucket.append({"confidence": [lo, min(hi, 1.0)], "n": int(sel.sum()),
                          "accuracy": float(correct[sel].mean()) if sel.any() else None})
    return {"n": int(len(correct)), "accuracy": float(correct.mean()) if len(correct) else None,
            "per_class": per_class, "by_confidence": by_bucket}
