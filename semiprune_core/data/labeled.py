"""Choosing the labeled subset of the train rows: class-balanced, seeded.

For benchmark pools the reference labels are the hidden true labels: this simulates "we paid to
annotate a class-balanced random subset" (as SemiPrune does), and the chosen rows' labels become
their true labels. For real pools (imagefolder) the reference is the human labels: ``per_class`` /
``fraction`` / ``count`` then subsample the labels the user gave (the rest become unlabeled), and
with none of them set every human label is used.

Selections are nested: for one seed, ``per_class=k`` picks a subset of what ``per_class=k+1`` picks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DataError
from ..seeding import rng


def choose_labeled(reference_labels: np.ndarray, *, per_class: int | None = None, fraction: float | None = None,
                   count: int | None = None, seed: int, classes: Sequence[str] | None = None) -> np.ndarray:
    """Which train rows are labeled. reference_labels (N,) int, -1 = no label -> (N,) bool.

    Set at most one of:
      per_class  k rows of every class;
      fraction   round(fraction * class size) rows of every class (halves round up), at least 1;
      count      a total budget split as evenly as possible, the remainder going to classes drawn at random.
    None set: every row with a reference label. ``classes`` names the classes (default: those present);
    every class must end up with at least one labeled row.
    """
    ref = np.asarray(reference_labels)
    chosen_opts = [k for k, v in (("per_class", per_class), ("fraction", fraction), ("count", count)) if v is not None]
    if len(chosen_opts) > 1:
        raise DataError(f"set only one of per_class, fraction, count (got {', '.join(chosen_opts)})",
                        "set the others to null in data.labeled")
    names = list(classes) if classes is not None else [str(c) for c in range(int(ref.max(initial=-1)) + 1)]
    n_classes = len(names)
    sizes = np.bincount(ref[ref >= 0], minlength=n_classes)
    if not sizes.any():
        raise DataError("no train sample has a label to start from",
                        "label some files (data.labels_csv or class folders) or use a benchmark source")

    if per_class is not None:
        quota = np.full(n_classes, per_class)
        what = f"data.labeled.per_class={per_class}"
    elif fraction is not None:
        quota = np.maximum(1, np.floor(fraction * sizes + 0.5).astype(int)) * (sizes > 0)
        what = f"data.labeled.fraction={fraction}"
    elif count is not None:
        quota = np.full(n_classes, count // n_classes)
        quota[rng(seed, "labeled", "remainder").choice(n_classes, size=count % n_classes, replace=False)] += 1
        what = f"data.labeled.count={count}"
    else:
        quota, what = sizes, None

    too_small = np.flatnonzero(quota > sizes)
    if len(too_small):
        c = too_small[0]
        raise DataError(f"{what} asks for {quota[c]} labels of class {names[c]!r}, which has only {sizes[c]} "
                        "sample(s) to draw from", "lower the label budget or use data.labeled.fraction")
    # One random order over all rows; each class takes its first `quota` rows in that order.
    rank = np.empty(len(ref), np.int64)
    rank[rng(seed, "labeled").permutation(len(ref))] = np.arange(len(ref))
    mask = np.zeros(len(ref), bool)
    for c in range(n_classes):
        members = np.flatnonzero(ref == c)
        mask[members[np.argsort(rank[members], kind="stable")[: quota[c]]]] = True

    empty = np.flatnonzero(np.bincount(ref[mask], minlength=n_classes) == 0)
    if len(empty):
        raise DataError(f"class {names[empty[0]]!r} has no labeled sample ({len(empty)} class(es) without one)",
                        "every class needs at least one label: raise the label budget, or label a sample of it")
    return mask
