"""K-fold split of the pool for out-of-sample (UNSEEN single-step) scoring: stratified, seeded.

Fold ``k``'s proxy model trains on every other fold and evaluates fold ``k`` each epoch, so every
sample gets exactly one out-of-sample trajectory. Stratifying by the target label (pseudo-label or
human label) keeps each proxy's training set at the pool's class balance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..seeding import rng

MAX_FOLDS = int(np.iinfo(np.int8).max)


def assign_folds(targets: np.ndarray, *, k: int, seed: int, classes: Sequence[str] | None = None) -> np.ndarray:
    """Fold id of every sample. targets (N,) int class ids >= 0 -> (N,) int8 in 0..k-1.

    Each class's samples are shuffled (seeded stream ``"folds"``) and dealt round-robin over the folds,
    the deal continuing from where the previous class stopped (at a seeded starting fold), so:
      - every class is spread over the folds as evenly as possible (its per-fold counts differ by <= 1);
      - fold sizes differ by at most 1 overall.
    ``classes`` names the classes in error messages (default: the class ids). Classes with no sample are
    ignored. Raises :class:`ConfigError` for k < 2 (or k > 127) and :class:`DataError` when a class has
    fewer samples than folds, when ``targets`` is empty or has negative ids, or when a fold would be empty.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= MAX_FOLDS:
        raise ConfigError(f"the number of folds k must be an integer in 2..{MAX_FOLDS}, got {k!r}",
                          "set k (K=2 costs about one proxy training)")
    k = int(k)
    y = np.asarray(targets)
    if y.ndim != 1:
        raise DataError(f"fold targets must be a 1-D array of class ids, got shape {y.shape}", "pass one target per sample")
    if len(y) == 0:
        raise DataError("cannot split an empty pool into folds", "check the pool: it has no samples")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"fold targets must be integer class ids, got dtype {y.dtype}", "pass pseudo-label ids, not names")
    if (y < 0).any():
        raise DataError(f"fold targets contain {int((y < 0).sum())} negative (unlabeled) id(s)",
                        "give every pool sample a target (pseudo-label) before splitting into folds")

    sizes = np.bincount(y)
    present = np.flatnonzero(sizes)
    smallest = present[np.argmin(sizes[present])]
    if sizes[smallest] < k:
        name = classes[smallest] if classes is not None and smallest < len(classes) else str(int(smallest))
        raise DataError(f"class {name!r} has {int(sizes[smallest])} sample(s), fewer than k={k} folds",
                        "lower k or merge/drop that class")

    gen = rng(seed, "folds")
    folds = np.empty(len(y), np.int8)
    position = int(gen.integers(k))  # where the round-robin deal starts
    order = np.argsort(y, kind="stable")  # members of class c are order[start_c : start_c + size_c]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for c in present:
        members = order[starts[c] : starts[c] + sizes[c]]
        members = members[gen.permutation(len(members))]
        folds[members] = (position + np.arange(len(members))) % k
        position = (position + len(members)) % k

    fold_sizes = np.bincount(folds, minlength=k)
    if (fold_sizes == 0).any():  # unreachable when every class has >= k samples; kept as a guard
        raise DataError(f"fold {int(np.argmin(fold_sizes))} would be empty", "lower k")
    return folds
