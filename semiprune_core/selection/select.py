"""The coreset of a pool: budget, seed set, class quotas, then a strategy on what is left.

:func:`select` is pure: arrays in, a :class:`Selection` out. Rules every strategy obeys here:
  - the budget n = floor((1 - ratio) * N) is met exactly, and nothing is chosen twice;
  - with ``keep_labeled`` the human-labeled seed set is kept and counts towards the budget;
  - with ``class_balance`` every class gets an equal share (water-filled: a class smaller than its
    share keeps all of it and the rest is shared out), and the strategy runs inside each class;
  - ``min_per_class`` first gives each class that many (its seeds count), chosen by the strategy
    inside the class; the remaining budget then goes by the strategy over everything left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError
from ..scoring import HIGHER_MEANS
from .strategies import REASONS, STRATEGIES

#: Scores for which a higher value means an easier sample; every other score is oriented "higher = harder".
EASIER_IS_HIGHER = frozenset(name for name, means in HIGHER_MEANS.items() if means == "easier")


@dataclass(frozen=True)
class Selection:
    """is_kept (N,) bool; reason (N,) str; stratum (N,) int64 (-1 where none); rank (N,) int64:
    position from easiest (0) to hardest by the score used."""

    is_kept: np.ndarray
    reason: np.ndarray
    stratum: np.ndarray
    rank: np.ndarray

    @property
    def n_kept(self) -> int:
        return int(self.is_kept.sum())


def budget(n_pool: int, ratio: float) -> int:
    """How many samples a pruning ratio keeps: floor((1 - ratio) * N), and at least one."""
    if not 0 < ratio < 1:
        raise ConfigError(f"pruning ratio must be in (0, 1), got {ratio!r}", "set select.ratio, e.g. 0.5 to prune half")
    n = math.floor((1.0 - ratio) * n_pool + 1e-9)
    if n < 1:
        raise ConfigError(f"ratio {ratio} keeps no sample of {n_pool}", "lower select.ratio")
    return n


def hardness(score_name: str, values: np.ndarray) -> np.ndarray:
    """The named score oriented so that higher = harder (``oos_aum`` -> -aum); NaN is refused.

    Forgetting is NaN for never-learned samples: they rank hardest (one more than the largest count).
    """
    values = np.asarray(values, np.float64)
    base = score_name.split("_", 1)[1] if score_name.startswith(("oos_", "ins_")) else score_name
    if base == "forgetting":
        never = np.isnan(values)
        values = np.where(never, (np.nanmax(values) + 1) if (~never).any() else 1.0, values)
    bad = np.flatnonzero(np.isnan(values))
    if len(bad):
        raise DataError(f"score {score_name!r} is NaN for {len(bad)} samples (first at row {bad[0]})",
                        "re-run the scores stage, or choose another select.score")
    return -values if base in EASIER_IS_HIGHER else values


def class_quotas(counts: np.ndarray, n: int, floor: np.ndarray) -> np.ndarray:
    """Equal shares of ``n`` over classes, each within [floor_c, counts_c] (water-filling).

    counts, floor (C,) int. Remainders go one each to the classes in class order.
    """
    if (floor > counts).any():
        raise DataError("a class has fewer samples than its minimum", "lower select.min_per_class")
    if floor.sum() > n:
        raise ConfigError(f"class minimums need {int(floor.sum())} samples but the budget is {n}",
                          "lower select.min_per_class or select.ratio")
    lo, hi = 0, int(counts.max())
    while lo < hi:  # the largest level t with sum(clip(t, floor, counts)) <= n
        mid = (lo + hi + 1) // 2
        if np.clip(mid, floor, counts).sum() <= n:
            lo = mid
        else:
            hi = mid - 1
    quotas = np.clip(lo, floor, counts)
    for c in np.flatnonzero(quotas < counts)[: n - int(quotas.sum())]:
        quotas[c] += 1
    return quotas


def select(
    strategy: str,
    *,
    hardness: np.ndarray,
    targets: np.ndarray,
    is_seed: np.ndarray,
    ratio: float,
    rng: np.random.Generator,
    keep_labeled: bool = True,
    class_balance: bool = False,
    min_per_class: int = 0,
    class_names: list[str] | None = None,
    **options,
) -> Selection:
    """Choose the coreset. hardness (N,) float (higher = harder); targets (N,) int; is_seed (N,) bool.

    ``options`` go to the strategy (``cutoff``, ``strata``, ``c_d``, ``dual``, ``prob_mean``,
    ``features``, ``clusters``); per-sample arrays among them are (N,) or (N, D) and sliced with the pool.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown selection strategy {strategy!r}", f"choose one of {', '.join(STRATEGIES)}")
    fn = STRATEGIES[strategy]
    hardness, targets = np.asarray(hardness, np.float64), np.asarray(targets, np.int64)
    n_pool = len(hardness)
    n = budget(n_pool, ratio)
    num_classes = len(class_names) if class_names else int(targets.max(initial=-1)) + 1
    names = class_names or [str(c) for c in range(num_classes)]
    seeds = np.asarray(is_seed, bool) & keep_labeled
    if seeds.sum() > n:
        raise ConfigError(f"the human-labeled seed set ({int(seeds.sum())}) is larger than the budget ({n})",
                          "lower select.ratio, or set select.keep_labeled: false")
    counts = np.bincount(targets, minlength=num_classes)
    short = np.flatnonzero(counts < min_per_class)
    if len(short):
        c = short[0]
        raise DataError(f"class {names[c]!r} has {counts[c]} samples, fewer than select.min_per_class={min_per_class}",
                        "lower select.min_per_class")
    per_sample = {k: np.asarray(v) for k, v in options.items() if isinstance(v, np.ndarray) and len(v) == n_pool}
    scalars = {k: v for k, v in options.items() if k not in per_sample}

    is_kept = seeds.copy()
    reason = np.full(n_pool, REASONS["seed"], object)
    stratum = np.full(n_pool, -1, np.int64)

    def run(rows: np.ndarray, take: int) -> None:
        """Run the strategy on candidate ``rows`` (not yet kept), keeping ``take`` of them."""
        picked = fn(hardness[rows], take, rng, ratio=ratio, **scalars, **{k: v[rows] for k, v in per_sample.items()})
        is_kept[rows] = picked.is_kept
        reason[rows] = picked.reason
        stratum[rows] = picked.stratum

    seeds_per_class = np.bincount(targets[seeds], minlength=num_classes)
    if class_balance:
        floor = np.maximum(seeds_per_class, min_per_class)
        quotas = class_quotas(counts, n, floor)
        for c in range(num_classes):
            run(np.flatnonzero((targets == c) & ~seeds), int(quotas[c] - seeds_per_class[c]))
    else:
        if min_per_class:
            floor = np.minimum(np.maximum(min_per_class - seeds_per_class, 0), counts - seeds_per_class)
            if seeds.sum() + floor.sum() > n:
                raise ConfigError(f"class minimums need {int(seeds.sum() + floor.sum())} samples but the budget is {n}",
                                  "lower select.min_per_class or select.ratio")
            for c in np.flatnonzero(floor):
                run(np.flatnonzero((targets == c) & ~seeds), int(floor[c]))
        rest = np.flatnonzero(~is_kept)
        run(rest, n - int(is_kept.sum()))
    assert is_kept.sum() == n, (int(is_kept.sum()), n)
    rank = np.empty(n_pool, np.int64)
    rank[np.lexsort((np.arange(n_pool), hardness))] = np.arange(n_pool)
    return Selection(is_kept, reason, stratum, rank)
