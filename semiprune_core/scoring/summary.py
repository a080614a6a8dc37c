"""Summaries for reports: how spread out a score is, and how well it ranks known-bad samples."""

from __future__ import annotations

import numpy as np

PERCENTILES = (5, 25, 50, 75, 95)


def spread_summary(values: np.ndarray) -> dict[str, float]:
    """Spread of one score over samples (NaN ignored). values (N,) -> dict of floats:

    n, n_nan, mean, std (population), min, p5, p25, p50, p75, p95, max, iqr (p75 - p25),
    p5_p95 (width of the central 90%), range (max - min).
    In-sample scores crowd into a narrow band (the model fit those samples); compare ``iqr`` / ``p5_p95``
    of ``ins_<score>`` and ``oos_<score>``, which are in the same units.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = v[~np.isnan(v)]
    out = {"n": float(len(v)), "n_nan": float(len(v) - len(finite))}
    if len(finite) == 0:
        keys = ["mean", "std", "min", *(f"p{p}" for p in PERCENTILES), "max", "iqr", "p5_p95", "range"]
        return {**out, **{k: float("nan") for k in keys}}
    pct = np.percentile(finite, PERCENTILES)
    out.update(mean=float(finite.mean()), std=float(finite.std()), min=float(finite.min()))
    out.update({f"p{p}": float(x) for p, x in zip(PERCENTILES, pct)})
    out.update(max=float(finite.max()), iqr=float(pct[3] - pct[1]), p5_p95=float(pct[4] - pct[0]),
               range=float(finite.max() - finite.min()))
    return out


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks (N,) float64 with ties given their average rank (like scipy's ``rankdata``)."""
    v = np.asarray(values).ravel()
    n = len(v)
    order = np.argsort(v, kind="mergesort")
    s = v[order]
    new_group = np.empty(n, bool)
    new_group[:1] = True
    new_group[1:] = s[1:] != s[:-1]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    average = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(n, np.float64)
    ranks[order] = average[group]
    return ranks


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive) for boolean ``positives``.

    scores (N,) float, no NaN; positives (N,) bool. Rank-based (Mann-Whitney U), ties count one half.
    For "does a low AUM find mislabeled samples" pass ``-aum``. Raises ``ValueError`` for NaN scores
    or when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=bool).ravel()
    if s.shape != pos.shape:
        raise ValueError(f"scores and positives must have the same shape, got {s.shape} and {pos.shape}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN(s); drop or fill them first")
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative samples")
    rank_sum = rankdata(s)[pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
