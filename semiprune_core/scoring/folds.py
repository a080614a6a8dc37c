"""Out-of-sample and in-sample scores from the K fold files of UNSEEN single-step scoring.

File ``k`` holds proxy ``k``'s trajectories for the whole pool: out-of-sample for fold ``k`` (its
held-out fold), in-sample for the rest. Every sample therefore has exactly one out-of-sample
trajectory and K-1 in-sample ones. :func:`combine_folds` reads the files one at a time (memory: one
file's dynamics plus the (N,) accumulators), scores each with :func:`compute_scores`, and returns

  sample_id            (N,) str, sorted
  fold                 (N,) int8
  oos_<score>          the score from the model that never trained on the sample
  ins_<score>          the mean over the K-1 models that trained on it
for every score in :data:`SCORES`. Two scores need a rule for the in-sample mean:
  ins_never_learned    float: the *fraction* of in-sample models that never learned the sample
                       (``oos_never_learned`` stays bool)
  ins_forgetting       mean over the in-sample models that did learn it; NaN if none did
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from ..dynamics.store import read_dynamics
from ..errors import DataError
from .scores import SCORES, compute_scores

logger = logging.getLogger(__name__)


def combine_folds(
    paths: Sequence[str | os.PathLike],
    *,
    window: int,
    first_dual: int,
    first_el2n: int,
) -> dict[str, np.ndarray]:
    """Per-sample ``oos_<score>`` and ``ins_<score>`` from K >= 2 fold dynamics files (see module doc).

    paths   the K dynamics files (``artifacts/dynamics/fold_<k>.parquet``), any order
    window, first_dual, first_el2n   as in :func:`compute_scores`
    Raises :class:`DataError` naming the file when the files do not cover the same sample ids, disagree on
    a sample's fold, mark as held out anything but exactly one fold, or when a sample is out-of-sample in
    no file or in more than one.
    """
    paths = list(paths)
    if len(paths) < 2:
        raise DataError(f"out-of-sample scores need K >= 2 fold files, got {len(paths)}", "run score@fold for every fold")
    ids = fold = None
    epochs: dict[str, int] = {}
    for path in paths:
        dyn = read_dynamics(path)
        if ids is None:
            ids, fold, n = dyn.sample_ids, dyn.fold, dyn.n_samples
            oos = {s: np.full(n, np.nan) for s in SCORES if s != "never_learned"}
            oos["never_learned"] = np.zeros(n, bool)
            ins_sum = {s: np.zeros(n) for s in SCORES}
            ins_cnt = {s: np.zeros(n, np.int32) for s in SCORES}
            oos_cnt = np.zeros(n, np.int32)
        else:
            _same_samples(path, paths[0], ids, dyn.sample_ids)
            if not np.array_equal(fold, dyn.fold):
                first = int(np.flatnonzero(fold != dyn.fold)[0])
                raise DataError(f"{path} puts sample {ids[first]!r} in fold {dyn.fold[first]}, {paths[0]} in fold {fold[first]}",
                                "re-run score@fold for all folds with the same fold assignment")
        held = np.unique(dyn.fold[dyn.is_oos])
        if len(held) != 1 or not np.array_equal(dyn.is_oos, dyn.fold == held[0]):
            raise DataError(f"{path} does not hold out exactly one whole fold (held-out folds: {held.tolist()})",
                            "re-run score@fold for that fold")
        epochs[str(path)] = dyn.epochs
        scores = compute_scores(dyn, window=window, first_dual=first_dual, first_el2n=first_el2n)
        is_oos, is_ins = dyn.is_oos, ~dyn.is_oos
        del dyn
        oos_cnt += is_oos
        for s, v in scores.items():
            oos[s][is_oos] = v[is_oos]
            use = is_ins if s == "never_learned" else is_ins & ~np.isnan(v)
            ins_sum[s][use] += v[use]
            ins_cnt[s][use] += 1
        del scores

    bad = np.flatnonzero(oos_cnt != 1)
    if len(bad):
        raise DataError(f"sample {ids[bad[0]]!r} is out-of-sample in {oos_cnt[bad[0]]} fold files, not exactly one "
                        f"({len(bad)} sample(s) affected)", "pass one file per fold, every fold once")
    if len(set(epochs.values())) > 1:
        logger.warning("fold files have different epoch counts %s (a run stopped early?): their scores mix scales", epochs)
    out: dict[str, np.ndarray] = {"sample_id": ids, "fold": fold}
    for s in SCORES:
        out[f"oos_{s}"] = oos[s]
    for s in SCORES:
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"ins_{s}"] = np.where(ins_cnt[s] > 0, ins_sum[s] / np.maximum(ins_cnt[s], 1), np.nan)
    return out


def _same_samples(path, first_path, ids: np.ndarray, other: np.ndarray) -> None:
    if len(other) != len(ids):
        raise DataError(f"{path} has {len(other)} samples, {first_path} has {len(ids)}",
                        "every fold file must cover the whole pool: re-run score@fold for all folds")
    if not np.array_equal(ids, other):
        first = int(np.flatnonzero(ids != other)[0])
        raise DataError(f"{path} has sample {other[first]!r} where {first_path} has {ids[first]!r}",
                        "every fold file must cover the same pool: re-run score@fold for all folds")
