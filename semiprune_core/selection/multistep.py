"""Multi-step UNSEEN selection (METHODS.md, our reading): reach the budget in S steps.

Step 1 keeps n/S samples by a base strategy on the single-step (fold-wise) scores. Step t trains a
scorer on the coreset so far and scores every sample not yet in it (unseen by that scorer); the
base strategy then adds the next n/S from those. With ``class_aware``, a step's quota is split
across classes in proportion to the scorer's held-out error on each class.

The driver is pure: training lives in the ``scorer`` callback, so it can be tested with any scorer.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import ConfigError
from .select import Selection, budget, select
from .strategies import REASONS, STRATEGIES

#: base strategies that need nothing but the hardness (the scorer of each step provides only that)
STEP_STRATEGIES = ("random", "easy", "hard", "ccs", "aum_cutoff")

#: scorer(step, coreset_rows, candidate_rows) -> (hardness of the candidates (higher = harder),
#:                                               held-out error per class (C,) in [0, 1])
Scorer = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def proportional_quotas(weights: np.ndarray, available: np.ndarray, n: int) -> np.ndarray:
    """``n`` split over classes in proportion to ``weights``, none above ``available`` (largest remainder).

    Classes with zero weight get a share only when the others are full. Always sums to min(n, available.sum()).
    """
    weights = np.clip(np.asarray(weights, np.float64), 0, None)
    available = np.asarray(available, np.int64)
    n = min(int(n), int(available.sum()))
    quotas = np.zeros(len(available), np.int64)
    open_ = available > 0
    while quotas.sum() < n and open_.any():
        w = np.where(open_, weights, 0.0)
        if w.sum() <= 0:
            w = open_.astype(np.float64)
        left = n - quotas.sum()
        share = w / w.sum() * left
        add = np.minimum(np.floor(share).astype(np.int64), available - quotas)
        if add.sum() == 0:  # hand out the remainder one by one, largest fraction first
            order = np.lexsort((np.arange(len(share)), -(share - np.floor(share))))
            for c in order:
                if open_[c] and quotas[c] < available[c] and quotas.sum() < n:
                    quotas[c] += 1
            open_ &= quotas < available
            continue
        quotas += add
        open_ &= quotas < available
    return quotas


def multistep_select(*, base: str, steps: int, hardness: np.ndarray, targets: np.ndarray, is_seed: np.ndarray,
                     ratio: float, rng: np.random.Generator, scorer: Scorer, keep_labeled: bool = True,
                     class_aware: bool = False, num_classes: int | None = None, **options) -> Selection:
    """The coreset at ``ratio`` in ``steps`` steps; ``stratum`` is the step (1-based) that kept a sample.

    ``hardness`` is the single-step score (step 1, and every sample's ``rank``); ``options`` go to the
    base strategy (``cutoff``, ``strata``). A pruned sample's reason is its last step's verdict.
    """
    if base not in STEP_STRATEGIES:
        raise ConfigError(f"unseen_multistep cannot step with {base!r}: its scorers provide only a hardness",
                          f"set select.step_strategy to one of {', '.join(STEP_STRATEGIES)}")
    if steps < 2:
        raise ConfigError(f"unseen_multistep needs at least 2 steps, got {steps}", "set select.steps >= 2")
    hardness, targets = np.asarray(hardness, np.float64), np.asarray(targets, np.int64)
    n_pool = len(hardness)
    n = budget(n_pool, ratio)
    seeds = np.asarray(is_seed, bool) & keep_labeled
    num_classes = num_classes or int(targets.max(initial=-1)) + 1
    # the coreset size after each step; step 1 holds at least the seed set
    sizes = [max(int(seeds.sum()), (n * t) // steps) for t in range(1, steps + 1)]
    if sizes[0] >= n or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(f"{steps} steps cannot each add samples to a budget of {n} (seed set {int(seeds.sum())})",
                          "use fewer select.steps, or a lower select.ratio")
    first = select(base, hardness=hardness, targets=targets, is_seed=is_seed, ratio=1 - sizes[0] / n_pool,
                   rng=rng, keep_labeled=keep_labeled, **options)
    if first.n_kept != sizes[0]:  # floor((1 - r) * N) may miss by one: settle on what step 1 kept
        sizes[0] = first.n_kept
    kept, reason = first.is_kept.copy(), first.reason.copy()
    step_of = np.where(kept, 1, -1).astype(np.int64)
    fn = STRATEGIES[base]
    for t in range(2, steps + 1):
        cand = np.flatnonzero(~kept)
        take = sizes[t - 1] - int(kept.sum())
        h, error = scorer(t, np.flatnonzero(kept), cand)
        h = np.asarray(h, np.float64)
        if h.shape != cand.shape:
            raise ValueError(f"step {t}: the scorer returned {h.shape} hardness values for {len(cand)} candidates")
        groups = [(np.arange(len(cand)), take)]
        if class_aware:
            available = np.bincount(targets[cand], minlength=num_classes)
            if base in ("aum_cutoff", "ccs"):  # what the cutoff leaves in each class
                available = available - np.floor(options.get("cutoff", 0.0) * available).astype(np.int64)
            quotas = proportional_quotas(error, available, take)
            groups = [(np.flatnonzero(targets[cand] == c), int(quotas[c])) for c in range(num_classes) if quotas[c]]
        for local, quota in groups:
            picked = fn(h[local], quota, rng, ratio=ratio, **options)
            rows = cand[local]
            kept[rows] = picked.is_kept
            reason[rows] = picked.reason
            step_of[rows[picked.is_kept]] = t
        if class_aware:  # classes given no quota were judged too: say so in the same words
            judged = np.zeros(len(cand), bool)
            for local, _ in groups:
                judged[local] = True
            reason[cand[~judged]] = REASONS["quota_pruned"].format(step=t)
    assert kept.sum() == n, (int(kept.sum()), n)
    return Selection(kept, reason, step_of, first.rank)
