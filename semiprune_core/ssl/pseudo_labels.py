"""From class probabilities to the target label every later stage trains and scores against.

Pure numpy. Human labels always win over pseudo-labels.
"""

from __future__ import annotations

import numpy as np

from ..data.pool import UNLABELED

HUMAN, PSEUDO = "human", "pseudo"
# the baselines' label sources: the dataset's true labels everywhere (the full-label oracle), and
# k-means clusters of features learned without any label (label-free)
ORACLE, CLUSTER = "oracle", "cluster"
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


def oracle_labels(true_labels: np.ndarray) -> dict[str, np.ndarray]:
    """The full-label oracle: every target is the true label (benchmarks only; no SSL involved)."""
    true = np.asarray(true_labels, np.int64)
    one = np.ones(len(true))
    return {"pseudo_label": true, "confidence": one, "margin": one, "entropy": np.zeros(len(true)),
            "target": true, "label_source": np.full(len(true), ORACLE)}


def cluster_labels(images: np.ndarray, k: int, rng: np.random.Generator, *, dims: int = 50) -> dict[str, np.ndarray]:
    """Label-free targets: k-means clusters (``k`` = the number of classes) of the images' top ``dims``
    principal components; no label is read. A cluster id is a target, not a class: the pipeline
    scores and selects with it like with any label (the ELFS recipe without a pretrained encoder).
    ``confidence`` is a softmax over negative squared distances to the centres (scaled by their mean).
    """
    from ..selection.strategies import kmeans

    x = np.asarray(images, np.float32).reshape(len(images), -1) / 255.0
    x -= x.mean(0)
    _, vectors = np.linalg.eigh((x.T @ x) / len(x))  # ascending eigenvalues
    z = x @ vectors[:, ::-1][:, : min(dims, x.shape[1])]
    _, centres = kmeans(z, k, rng)
    dist = (z**2).sum(1)[:, None] - 2 * z @ centres.T + (centres**2).sum(1)[None]
    logits = -dist / max(float(dist.mean()), 1e-12)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    cols = pseudo_labels(probs, human_labels=np.full(len(x), UNLABELED))
    cols["label_source"] = np.full(len(x), CLUSTER)
    return cols
