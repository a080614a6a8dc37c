"""Coreset strategies: pure functions from per-sample arrays to a kept mask and a reason per sample.

Every strategy takes the candidates' ``hardness`` (M,) float (higher = harder; :func:`hardness`
orients any named score that way), the number ``n`` to keep (0 <= n <= M), a seeded
``np.random.Generator`` and keyword options, and returns a :class:`Picked`. Exactly ``n`` are kept,
none twice. Reasons come from :data:`REASONS` (templates filled with numbers only), so an audit can
group by them. See METHODS.md for the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

REASONS = {
    "seed": "kept: human-labeled seed",
    "random_kept": "kept: drawn at random",
    "random_pruned": "pruned: not drawn at random",
    "easy_kept": "kept: among the easiest",
    "easy_pruned": "pruned: hardest surplus",
    "hard_kept": "kept: among the hardest",
    "hard_pruned": "pruned: easiest surplus",
    "cutoff_pruned": "pruned: beyond the hard cutoff (likely wrong label)",
    "window_kept": "kept: inside the cutoff window",
    "stratum_kept": "kept: drawn in stratum {stratum} of {strata}",
    "stratum_pruned": "pruned: not drawn in stratum {stratum} of {strata}",
    "dual_kept": "kept: drawn by DUAL-Beta weight",
    "dual_pruned": "pruned: not drawn by DUAL-Beta weight",
    "atypical_kept": "kept: far from its cluster centre",
    "typical_pruned": "pruned: prototypical (close to its cluster centre)",
    "quota_pruned": "pruned: its class got no quota at step {step}",
}


@dataclass(frozen=True)
class Picked:
    """is_kept (M,) bool; reason (M,) str; stratum (M,) int64, -1 where the strategy has none."""

    is_kept: np.ndarray
    reason: np.ndarray
    stratum: np.ndarray


def _picked(m: int, kept_rows: np.ndarray, kept: str, pruned: str, stratum: np.ndarray | None = None) -> Picked:
    is_kept = np.zeros(m, bool)
    is_kept[kept_rows] = True
    reason = np.where(is_kept, REASONS[kept], REASONS[pruned]).astype(object)
    return Picked(is_kept, reason, np.full(m, -1, np.int64) if stratum is None else stratum)


def _order(hardness: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows from easiest to hardest; ties in random (seeded) order, never by position."""
    return np.lexsort((rng.permutation(len(hardness)), hardness))


def random(hardness: np.ndarray, n: int, rng: np.random.Generator, **_) -> Picked:
    return _picked(len(hardness), rng.permutation(len(hardness))[:n], "random_kept", "random_pruned")


def easy(hardness: np.ndarray, n: int, rng: np.random.Generator, **_) -> Picked:
    return _picked(len(hardness), _order(hardness, rng)[:n], "easy_kept", "easy_pruned")


def hard(hardness: np.ndarray, n: int, rng: np.random.Generator, **_) -> Picked:
    return _picked(len(hardness), _order(hardness, rng)[::-1][:n], "hard_kept", "hard_pruned")


# The authors' cutoff per kept fraction (SemiPrune): it grows as the coreset shrinks, because a small
# coreset cannot afford the likely-mislabeled hardest samples.
CUTOFF_SCHEDULE = ((0.1, 0.7), (0.2, 0.6), (0.3, 0.5), (0.5, 0.2), (0.7, 0.0))


def auto_cutoff(ratio: float) -> float:
    """m for pruning ratio ``ratio``: linear between the published points, flat beyond them."""
    kept, m = zip(*CUTOFF_SCHEDULE)
    return round(float(np.interp(1 - ratio, kept, m)), 6)


def _hard_cutoff(hardness: np.ndarray, n: int, rng: np.random.Generator, cutoff: float) -> tuple[np.ndarray, int]:
    """(rows from hardest to easiest, how many of the hardest the cutoff drops); an error if the
    cutoff leaves fewer than ``n`` to keep."""
    m = len(hardness)
    drop = math.floor(cutoff * m)
    if n and drop + n > m:
        raise ConfigError(
            f"cutoff {cutoff} drops {drop} of {m} samples, leaving fewer than the {n} to keep",
            "lower select.cutoff or raise select.ratio (kept fraction + cutoff must stay below 1)")
    return _order(hardness, rng)[::-1], drop


def aum_cutoff(hardness: np.ndarray, n: int, rng: np.random.Generator, *, cutoff: float = 0.0, **_) -> Picked:
    """Double-end pruning: drop the floor(cutoff*M) hardest, keep the next ``n``, drop the easiest rest."""
    hardest_first, drop = _hard_cutoff(hardness, n, rng, cutoff)
    out = _picked(len(hardness), hardest_first[drop : drop + n], "window_kept", "hard_pruned")
    out.reason[hardest_first[:drop]] = REASONS["cutoff_pruned"]
    return out


def ccs(hardness: np.ndarray, n: int, rng: np.random.Generator, *, cutoff: float = 0.0, strata: int = 50, **_) -> Picked:
    """Coverage-centric: drop the hardest floor(cutoff*M), split the rest's score range into ``strata``
    equal-width bins, hand out the budget from the smallest bin up, draw uniformly inside each."""
    m = len(hardness)
    if strata < 1:
        raise ConfigError(f"strata must be >= 1, got {strata}", "set select.strata, e.g. 50")
    hardest_first, drop = _hard_cutoff(hardness, n, rng, cutoff)
    rest = hardest_first[drop:]
    stratum = np.full(m, -1, np.int64)
    if len(rest):
        lo, hi = hardness[rest].min(), hardness[rest].max()
        width = (hi - lo) / strata
        stratum[rest] = np.clip(((hardness[rest] - lo) / width).astype(np.int64), 0, strata - 1) if width > 0 else 0
    members = [np.flatnonzero(stratum == s) for s in range(strata)]
    budget, kept = n, []
    for left, s in enumerate(sorted(range(strata), key=lambda s: (len(members[s]), s))):
        take = min(len(members[s]), budget // (strata - left))
        kept.append(rng.choice(members[s], size=take, replace=False))
        budget -= take
    # integer division can leave a remainder: give it to the bins that still have room, largest first
    leftover = [np.setdiff1d(members[s], k) for s, k in zip(sorted(range(strata), key=lambda s: (len(members[s]), s)), kept)]
    for extra in sorted(leftover, key=len, reverse=True):
        if budget == 0:
            break
        take = min(len(extra), budget)
        kept.append(rng.choice(extra, size=take, replace=False))
        budget -= take
    kept_rows = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    is_kept = np.zeros(m, bool)
    is_kept[kept_rows] = True
    reason = np.empty(m, object)
    reason[hardest_first[:drop]] = REASONS["cutoff_pruned"]
    for rows, key in ((np.flatnonzero(is_kept), "stratum_kept"), (np.flatnonzero(~is_kept & (stratum >= 0)), "stratum_pruned")):
        reason[rows] = [REASONS[key].format(stratum=s + 1, strata=strata) for s in stratum[rows]]
    return Picked(is_kept, reason, stratum)


def beta_logpdf(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    x = np.clip(x, 1e-6, 1 - 1e-6)
    log_norm = math.lgamma(alpha + beta) - math.lgamma(alpha) - math.lgamma(beta)
    return (alpha - 1) * np.log(x) + (beta - 1) * np.log1p(-x) + log_norm


def dual_beta(hardness: np.ndarray, n: int, rng: np.random.Generator, *, dual: np.ndarray,
              prob_mean: np.ndarray, ratio: float, c_d: float = 4.0, **_) -> Picked:
    """Semi-DUAL-Beta: draw ``n`` without replacement with probability proportional to
    BetaPDF(prob_mean; alpha, beta) * dual, beta = 15 (1 - a)(1 - ratio^c_d), alpha = 16 - beta,
    a = mean prob_mean of the 10 samples with the highest DUAL."""
    m = len(hardness)
    if m == 0:
        return _picked(0, np.zeros(0, np.int64), "dual_kept", "dual_pruned")
    top = np.argsort(-dual, kind="stable")[:10]
    a = float(prob_mean[top].mean())
    b = max(15.0 * (1.0 - a) * (1.0 - ratio**c_d), 1e-3)
    with np.errstate(divide="ignore"):  # dual = 0 -> weight 0 -> log weight -inf: drawn last
        log_w = beta_logpdf(prob_mean, 16.0 - b, b) + np.log(np.maximum(dual, 0.0))
    # Efraimidis-Spirakis: the n largest log(u)/w are a weighted draw without replacement.
    # In log space: key = log(-log u) - log w, smallest first; zero weights come last, in random order.
    u = rng.random(m)
    key = np.log(-np.log(np.clip(u, 1e-300, 1.0))) - log_w
    order = np.lexsort((rng.permutation(m), np.nan_to_num(key, nan=np.inf, posinf=np.inf)))
    return _picked(m, order[:n], "dual_kept", "dual_pruned")


def kmeans(features: np.ndarray, k: int, rng: np.random.Generator, *, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding. features (M, D) -> (assignment (M,), centres (k, D))."""
    x = np.asarray(features, np.float64)
    m = len(x)
    k = min(k, m)
    centres = [x[rng.integers(m)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(m, 1 / m)
        centres.append(x[rng.choice(m, p=p)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = np.stack(centres)
    assign = np.zeros(m, np.int64)
    for _ in range(iters):
        dist = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None]
        new = dist.argmin(1)
        if _ and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            if (assign == j).any():
                c[j] = x[assign == j].mean(0)
    return assign, c


def prototypicality(hardness: np.ndarray, n: int, rng: np.random.Generator, *, features: np.ndarray,
                    clusters: int, **_) -> Picked:
    """Label-free: k-means on features, keep the ``n`` farthest from their cluster centre (stratum = cluster)."""
    m = len(hardness)
    if m == 0:
        return _picked(0, np.zeros(0, np.int64), "atypical_kept", "typical_pruned")
    assign, centres = kmeans(features, clusters, rng)
    distance = np.linalg.norm(np.asarray(features, np.float64) - centres[assign], axis=1)
    return _picked(m, _order(-distance, rng)[:n], "atypical_kept", "typical_pruned", stratum=assign)


STRATEGIES = {
    "random": random, "easy": easy, "hard": hard, "ccs": ccs, "aum_cutoff": aum_cutoff,
    "dual_beta": dual_beta, "prototypicality": prototypicality,
}
