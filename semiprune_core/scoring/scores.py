"""Per-sample scores from training-dynamics trajectories (METHODS.md, "Scores").

Every function takes per-sample trajectories as (N, E) arrays (sample n, epoch t = 0..E-1, any float
dtype; float16 is upcast) and returns an (N,) float64 array (``never_learned``: bool). Options are
keyword-only. Edge-case rules, shared by all window/first-T scores:
  - ``first`` larger than E: all E epochs are used;
  - a window ``w`` larger than the (possibly truncated) trajectory: one window over all of it;
  - windows slide by one epoch: starts 0..E'-w, i.e. E'-w+1 windows;
  - std is the population std (ddof=0), so a window of one epoch has std 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError

#: Names :func:`compute_scores` returns, in order.
SCORES: tuple[str, ...] = ("aum", "forgetting", "never_learned", "el2n", "entropy", "loss", "target_prob_mean",
                           "target_prob_mean_T", "dynunc", "dual")
#: Higher score means ... (for reports and for choosing easy/hard ends).
HIGHER_MEANS: dict[str, str] = {
    "aum": "easier", "forgetting": "harder", "never_learned": "harder", "el2n": "harder", "entropy": "more uncertain",
    "loss": "harder", "target_prob_mean": "easier", "target_prob_mean_T": "easier", "dynunc": "more uncertain",
    "dual": "more important",
}
#: Trajectories :func:`compute_scores` needs.
NEEDED: tuple[str, ...] = ("target_prob", "margin", "loss", "entropy", "el2n", "correct")


def _traj(x: np.ndarray, name: str = "trajectory") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be an (N, E) array with E >= 1, got shape {x.shape}")
    return x


def _epochs(value: int, name: str) -> int:
    """A positive epoch count (window width, first T) from the params; else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive number of epochs, got {value!r}", "fix the scores params")
    return int(value)


def _first(x: np.ndarray, first: int | None, name: str) -> np.ndarray:
    return x if first is None else x[:, : _epochs(first, name)]


def aum(margin: np.ndarray) -> np.ndarray:
    """Area under the margin: sum_t m_t. margin (N, E) of probabilities -> (N,). Higher = easier."""
    return _traj(margin, "margin").sum(axis=1, dtype=np.float64)


def never_learned(correct: np.ndarray) -> np.ndarray:
    """correct (N, E) bool -> (N,) bool: true where the sample was never classified correctly."""
    return ~_traj(correct, "correct").astype(bool, copy=False).any(axis=1)


def forgetting(correct: np.ndarray) -> np.ndarray:
    """Forgetting events #{t >= 1 : correct_{t-1} and not correct_t}. correct (N, E) bool -> (N,) float64.

    Never-learned samples (see :func:`never_learned`) get NaN, not a count of 0: "never learned" is
    harder than any count, and the caller decides how to rank it. At most floor(E / 2).
    """
    c = _traj(correct, "correct").astype(bool, copy=False)
    events = (c[:, :-1] & ~c[:, 1:]).sum(axis=1).astype(np.float64)
    events[~c.any(axis=1)] = np.nan
    return events


def el2n(el2n_traj: np.ndarray, *, first: int) -> np.ndarray:
    """Mean of ||p_t - onehot||_2 over the first ``first`` epochs (T_e; all when fewer). (N, E) -> (N,)."""
    return _first(_traj(el2n_traj, "el2n"), first, "first (EL2N epochs)").mean(axis=1, dtype=np.float64)


def entropy(entropy_traj: np.ndarray) -> np.ndarray:
    """Predictive entropy at the last epoch. (N, E) -> (N,)."""
    return _traj(entropy_traj, "entropy")[:, -1].astype(np.float64)


def loss(loss_traj: np.ndarray) -> np.ndarray:
    """Cross-entropy -log q_E at the last epoch. (N, E) -> (N,)."""
    return _traj(loss_traj, "loss")[:, -1].astype(np.float64)


def target_prob_mean(q: np.ndarray, *, first: int | None = None) -> np.ndarray:
    """Mean target probability over all epochs, or the first ``first`` (all when fewer). (N, E) -> (N,)."""
    return _first(_traj(q, "target_prob"), first, "first").mean(axis=1, dtype=np.float64)


def _window_stats(q: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, E) -> mean and population std of every width-``window`` window: two (N, W) float64 arrays,
    W = E - window + 1 (one window over everything when E < window).

    Two passes (mean, then squared deviations) accumulated over the ``window`` offsets: as exact as
    ``np.std`` on each window, with (N, W) temporaries instead of (N, W, window) ones (~7x faster).
    """
    x = q.astype(np.float64)
    w = min(window, x.shape[1])
    n_win = x.shape[1] - w + 1
    total = x[:, :n_win].copy()
    for j in range(1, w):
        total += x[:, j : j + n_win]
    mean = total / w
    sq = np.zeros_like(mean)
    for j in range(w):
        dev = x[:, j : j + n_win] - mean
        dev *= dev
        sq += dev
    return mean, np.sqrt(sq / w)


def dynunc(q: np.ndarray, *, window: int) -> np.ndarray:
    """Dynamic uncertainty: mean over sliding windows of width ``window`` of std(q in window).
    q (N, E) target probabilities -> (N,). 0 for a constant trajectory; higher = more uncertain."""
    _, std = _window_stats(_traj(q, "target_prob"), _epochs(window, "window"))
    return std.mean(axis=1)


def dual(q: np.ndarray, *, window: int, first: int) -> np.ndarray:
    """DUAL: over sliding windows of width ``window`` within the first ``first`` epochs,
    mean of std_w(q) * (1 - mean_w(q)). q (N, E) -> (N,). Higher = more important (uncertain, not yet learned)."""
    mean, std = _window_stats(_first(_traj(q, "target_prob"), first, "first (DUAL epochs)"), _epochs(window, "window"))
    return (std * (1.0 - mean)).mean(axis=1)


def compute_scores(
    dyn: Mapping[str, np.ndarray] | Any,
    *,
    window: int,
    first_dual: int,
    first_el2n: int,
    chunk_rows: int = 32_768,
) -> dict[str, np.ndarray]:
    """All scores of METHODS.md by name (see :data:`SCORES`) from one model's trajectories.

    dyn         mapping (or a :class:`~semiprune_core.dynamics.Dynamics`, via its ``trajectories``) with
                (N, E) arrays ``target_prob``, ``margin``, ``loss``, ``entropy``, ``el2n`` and bool ``correct``
    window      DynUnc / DUAL window width w
    first_dual  T of DUAL and of ``target_prob_mean_T`` (mu in DUAL-Beta)
    first_el2n  T_e of EL2N
    chunk_rows  rows processed at a time (bounds the float64 temporaries for float16 input)
    Returns (N,) arrays: float64 scores; ``never_learned`` bool; ``forgetting`` NaN where never learned.
    """
    traj = getattr(dyn, "trajectories", dyn)
    missing = [k for k in NEEDED if k not in traj]
    if missing:
        raise ValueError(f"compute_scores needs trajectories {list(NEEDED)}; missing {missing}")
    shapes = {k: np.shape(traj[k]) for k in NEEDED}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"trajectories must share one (N, E) shape, got {shapes}")
    _epochs(window, "window")
    _epochs(first_dual, "first_dual")
    _epochs(first_el2n, "first_el2n")
    chunk_rows = max(1, int(chunk_rows))
    n = shapes["margin"][0]
    out = {name: np.empty(n, bool if name == "never_learned" else np.float64) for name in SCORES}
    for start in range(0, n, chunk_rows):
        s = slice(start, start + chunk_rows)
        q = np.asarray(traj["target_prob"][s], dtype=np.float64)
        correct = np.asarray(traj["correct"][s]).astype(bool, copy=False)
        out["aum"][s] = aum(traj["margin"][s])
        out["forgetting"][s] = forgetting(correct)
        out["never_learned"][s] = never_learned(correct)
        out["el2n"][s] = el2n(traj["el2n"][s], first=first_el2n)
        out["entropy"][s] = entropy(traj["entropy"][s])
        out["loss"][s] = loss(traj["loss"][s])
        out["target_prob_mean"][s] = target_prob_mean(q)
        out["target_prob_mean_T"][s] = target_prob_mean(q, first=first_dual)
        out["dynunc"][s] = dynunc(q, window=window)
        out["dual"][s] = dual(q, window=window, first=first_dual)
    return out
