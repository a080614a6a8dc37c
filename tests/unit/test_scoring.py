"""Scores from trajectories computed by hand, edge cases, properties, fold combination, summaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from semiprune_core.dynamics import METRICS, write_dynamics
from semiprune_core.errors import ConfigError, DataError
from semiprune_core.scoring import (
    SCORES,
    aum,
    auroc,
    combine_folds,
    compute_scores,
    dual,
    dynunc,
    el2n,
    entropy,
    forgetting,
    loss,
    never_learned,
    rankdata,
    spread_summary,
    target_prob_mean,
)

# --- hand-computed values ---------------------------------------------------------------------------


def test_aum_sums_margins():
    m = np.array([[0.5, -0.25, 1.0], [-1.0, -1.0, -1.0]])
    np.testing.assert_allclose(aum(m), [1.25, -3.0])


def test_forgetting_counts_one_to_zero_transitions_and_flags_never_learned():
    c = np.array([
        [1, 0, 1, 0, 0],  # forgotten twice
        [0, 1, 1, 1, 1],  # learned once, never forgotten
        [1, 1, 1, 1, 1],  # always right
        [0, 0, 0, 0, 0],  # never learned
        [0, 0, 1, 0, 1],  # learned late, forgotten once
    ], bool)
    f = forgetting(c)
    np.testing.assert_array_equal(f[[0, 1, 2, 4]], [2, 0, 0, 1])
    assert np.isnan(f[3])
    np.testing.assert_array_equal(never_learned(c), [False, False, False, True, False])


def test_el2n_mean_over_first_epochs_and_all_when_fewer():
    x = np.array([[0.1, 0.3, 0.8, 0.8]])
    np.testing.assert_allclose(el2n(x, first=2), [0.2])
    np.testing.assert_allclose(el2n(x, first=20), [0.5])  # fewer epochs than T_e: all of them


def test_entropy_and_loss_take_the_last_epoch():
    x = np.array([[3.0, 2.0, 0.5], [1.0, 1.0, 2.0]])
    np.testing.assert_array_equal(entropy(x), [0.5, 2.0])
    np.testing.assert_array_equal(loss(x), [0.5, 2.0])


def test_target_prob_mean_all_and_first():
    q = np.array([[0.2, 0.4, 0.9]])
    np.testing.assert_allclose(target_prob_mean(q), [0.5])
    np.testing.assert_allclose(target_prob_mean(q, first=2), [0.3])


def test_dynunc_by_hand():
    # E=4, w=2: windows [0,1], [1,1], [1,0]; population stds 0.5, 0, 0.5 -> mean 1/3
    q = np.array([[0.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(dynunc(q, window=2), [1 / 3])
    # w=3: windows [0,1,1], [1,1,0]: std = sqrt(2/9) each
    np.testing.assert_allclose(dynunc(q, window=3), [np.sqrt(2 / 9)])


def test_dual_by_hand():
    # first=3, w=2 on [0.2, 0.6, 1.0, (0.0 ignored)]: windows [0.2,0.6] std .2 mean .4 -> .12;
    # [0.6,1.0] std .2 mean .8 -> .04; mean .08
    q = np.array([[0.2, 0.6, 1.0, 0.0]])
    np.testing.assert_allclose(dual(q, window=2, first=3), [0.08])


def test_windows_longer_than_the_trajectory_use_one_window():
    q = np.array([[0.2, 0.6, 1.0]])
    std = np.std(q[0])
    np.testing.assert_allclose(dynunc(q, window=10), [std])
    np.testing.assert_allclose(dual(q, window=10, first=30), [std * (1 - q.mean())])
    np.testing.assert_allclose(dual(q, window=10, first=2), [np.std(q[0, :2]) * (1 - q[0, :2].mean())])


def test_single_epoch():
    q = np.array([[0.7], [0.2]])
    c = np.array([[True], [False]])
    assert np.all(dynunc(q, window=10) == 0) and np.all(dual(q, window=10, first=30) == 0)
    np.testing.assert_array_equal(forgetting(c)[:1], [0])
    assert np.isnan(forgetting(c)[1])
    np.testing.assert_allclose(target_prob_mean(q, first=5), [0.7, 0.2])


def test_bad_options_and_shapes():
    q = np.ones((2, 3))
    with pytest.raises(ConfigError, match="window"):
        dynunc(q, window=0)
    with pytest.raises(ConfigError, match="first"):
        el2n(q, first=0)
    with pytest.raises(ValueError, match=r"\(N, E\)"):
        aum(np.ones(3))
    with pytest.raises(ValueError, match=r"\(N, E\)"):
        aum(np.ones((3, 0)))


# --- properties ---------------------------------------------------------------------------------------

probs = st.integers(1, 12).flatmap(lambda e: arrays(np.float64, (3, e), elements=st.floats(0, 1)))
bools = st.integers(1, 15).flatmap(lambda e: arrays(bool, (4, e)))


@settings(max_examples=50, deadline=None)
@given(probs, st.randoms())
def test_aum_and_means_ignore_epoch_order(q, random):
    perm = list(range(q.shape[1]))
    random.shuffle(perm)
    np.testing.assert_allclose(aum(q[:, perm]), aum(q))
    np.testing.assert_allclose(target_prob_mean(q[:, perm]), target_prob_mean(q))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 20), st.floats(0, 1), st.integers(1, 25), st.integers(1, 25))
def test_constant_trajectories_have_zero_uncertainty(e, value, window, first):
    q = np.full((2, e), value)
    np.testing.assert_allclose(dynunc(q, window=window), 0, atol=1e-12)
    np.testing.assert_allclose(dual(q, window=window, first=first), 0, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(bools)
def test_forgetting_is_bounded_by_half_the_epochs(c):
    f = forgetting(c)
    learned = ~np.isnan(f)
    assert np.array_equal(learned, c.any(1))
    assert np.all(f[learned] <= c.shape[1] // 2) and np.all(f[learned] >= 0)


@settings(max_examples=50, deadline=None)
@given(probs, st.integers(1, 12), st.integers(1, 12))
def test_window_scores_match_a_brute_force_definition(q, window, first):
    def windows(x):
        w = min(window, x.shape[1])
        return [x[:, s : s + w] for s in range(x.shape[1] - w + 1)]

    want_dynunc = np.mean([win.std(axis=1) for win in windows(q)], axis=0)
    want_dual = np.mean([win.std(axis=1) * (1 - win.mean(axis=1)) for win in windows(q[:, :first])], axis=0)
    np.testing.assert_allclose(dynunc(q, window=window), want_dynunc, atol=1e-12)
    np.testing.assert_allclose(dual(q, window=window, first=first), want_dual, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(probs, st.integers(1, 12), st.integers(1, 12))
def test_window_scores_are_bounded(q, window, first):
    d, u = dual(q, window=window, first=first), dynunc(q, window=window)
    assert np.all(d >= 0) and np.all(d <= 0.5 + 1e-12) and np.all(u >= 0) and np.all(u <= 0.5 + 1e-12)


# --- compute_scores -----------------------------------------------------------------------------------


def random_dynamics(n: int, e: int, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    q = g.uniform(0, 1, (n, e))
    return {"target_prob": q, "margin": 2 * q - 1, "loss": -np.log(q), "entropy": g.uniform(0, 2, (n, e)),
            "el2n": g.uniform(0, 1.4, (n, e)), "correct": q > 0.5}


def test_compute_scores_matches_the_functions_and_chunks_do_not_matter():
    dyn = random_dynamics(50, 7)
    out = compute_scores(dyn, window=3, first_dual=5, first_el2n=4, chunk_rows=8)
    assert list(out) == list(SCORES)
    np.testing.assert_allclose(out["aum"], aum(dyn["margin"]))
    np.testing.assert_allclose(out["dual"], dual(dyn["target_prob"], window=3, first=5))
    np.testing.assert_allclose(out["dynunc"], dynunc(dyn["target_prob"], window=3))
    np.testing.assert_allclose(out["el2n"], el2n(dyn["el2n"], first=4))
    np.testing.assert_allclose(out["target_prob_mean_T"], target_prob_mean(dyn["target_prob"], first=5))
    np.testing.assert_array_equal(out["forgetting"], forgetting(dyn["correct"]))
    assert out["never_learned"].dtype == bool
    whole = compute_scores(dyn, window=3, first_dual=5, first_el2n=4)
    for k in SCORES:
        np.testing.assert_array_equal(out[k], whole[k])


def test_compute_scores_accepts_float16_and_rejects_missing_or_ragged():
    dyn = random_dynamics(10, 4)
    half = {k: (v if k == "correct" else v.astype(np.float16)) for k, v in dyn.items()}
    out = compute_scores(half, window=2, first_dual=3, first_el2n=3)
    assert out["aum"].dtype == np.float64
    np.testing.assert_allclose(out["aum"], aum(dyn["margin"]), atol=1e-2)
    with pytest.raises(ValueError, match="missing"):
        compute_scores({k: v for k, v in dyn.items() if k != "el2n"}, window=2, first_dual=3, first_el2n=3)
    with pytest.raises(ValueError, match="shape"):
        compute_scores({**dyn, "loss": dyn["loss"][:, :2]}, window=2, first_dual=3, first_el2n=3)
    with pytest.raises(ConfigError, match="first_el2n"):
        compute_scores(dyn, window=2, first_dual=3, first_el2n=0)


# --- combine_folds ------------------------------------------------------------------------------------


def write_fold_files(tmp_path, n=40, e=6, k=2, seed=0, ids=None):
    """K fold files over one pool; fold j's file is out-of-sample for fold j. Returns paths, per-file dyn, fold."""
    g = np.random.default_rng(seed)
    fold = (np.arange(n) % k).astype(np.int8)
    ids = np.array([f"s{i:03d}" for i in g.permutation(n)], dtype=object) if ids is None else ids
    paths, dyns = [], []
    for j in range(k):
        dyn = random_dynamics(n, e, seed=seed + j)
        values = np.stack([dyn[m].astype(np.float64) for m in METRICS], axis=2).transpose(1, 0, 2)  # (E, N, M)
        path = tmp_path / f"fold_{j}.parquet"
        write_dynamics(path, ids, fold=fold, is_oos=fold == j, values=values, meta={"held_out_fold": j}, chunk_rows=7)
        paths.append(path)
        dyns.append({m: (v if m == "correct" else v.astype(np.float16)) for m, v in dyn.items()})
    return paths, dyns, fold, ids


def test_combine_folds_takes_oos_from_the_held_out_file_and_averages_in_sample(tmp_path):
    paths, dyns, fold, ids = write_fold_files(tmp_path, k=3)
    opts = {"window": 3, "first_dual": 4, "first_el2n": 3}
    out = combine_folds(paths[::-1], **opts)
    order = np.argsort(ids)
    assert list(out["sample_id"]) == sorted(ids)
    np.testing.assert_array_equal(out["fold"], fold[order])
    per_file = [compute_scores(d, **opts) for d in dyns]
    for s in SCORES:
        raw = np.stack([p[s] for p in per_file]).astype(np.float64)  # (K, N) in original row order
        oos = raw[fold, np.arange(len(fold))]
        ins_mask = np.arange(3)[:, None] != fold[None, :]
        expected_ins = np.nanmean(np.where(ins_mask, raw, np.nan), axis=0) if s != "never_learned" else \
            np.where(ins_mask, raw, 0).sum(0) / 2
        np.testing.assert_allclose(out[f"oos_{s}"], oos[order], rtol=1e-6, equal_nan=True, err_msg=s)
        np.testing.assert_allclose(out[f"ins_{s}"], expected_ins[order], rtol=1e-6, equal_nan=True, err_msg=s)
    assert out["oos_never_learned"].dtype == bool


def test_combine_folds_never_learned_everywhere_gives_nan_forgetting(tmp_path):
    n, e = 4, 3
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    fold = np.array([0, 1, 0, 1], np.int8)
    paths = []
    for j in range(2):
        values = np.zeros((e, n, len(METRICS)))
        values[..., METRICS.index("target_prob")] = 0.1
        values[:, :2, METRICS.index("correct")] = 1  # a and b always right, c and d never
        path = tmp_path / f"f{j}.parquet"
        write_dynamics(path, ids, fold=fold, is_oos=fold == j, values=values)
        paths.append(path)
    out = combine_folds(paths, window=2, first_dual=3, first_el2n=3)
    np.testing.assert_array_equal(out["oos_never_learned"], [False, False, True, True])
    np.testing.assert_array_equal(out["ins_never_learned"], [0, 0, 1, 1])
    np.testing.assert_array_equal(out["oos_forgetting"][:2], [0, 0])
    assert np.isnan(out["oos_forgetting"][2:]).all() and np.isnan(out["ins_forgetting"][2:]).all()


def test_combine_folds_errors(tmp_path):
    paths, _, fold, ids = write_fold_files(tmp_path, n=10, e=3, k=2)
    opts = {"window": 2, "first_dual": 3, "first_el2n": 3}
    with pytest.raises(DataError, match="K >= 2"):
        combine_folds(paths[:1], **opts)
    with pytest.raises(DataError, match="is out-of-sample in [02] fold files, not exactly one"):
        combine_folds([paths[0], paths[0]], **opts)
    values = np.zeros((3, 10, len(METRICS)))
    other = tmp_path / "other.parquet"
    write_dynamics(other, np.array([f"x{i}" for i in range(10)], dtype=object), fold=fold, is_oos=fold == 1, values=values)
    with pytest.raises(DataError, match="other.parquet has sample"):
        combine_folds([paths[0], other], **opts)
    short = tmp_path / "short.parquet"
    write_dynamics(short, ids[:8], fold=fold[:8], is_oos=fold[:8] == 1, values=values[:, :8])
    with pytest.raises(DataError, match="short.parquet has 8 samples"):
        combine_folds([paths[0], short], **opts)
    partial = tmp_path / "partial.parquet"
    write_dynamics(partial, ids, fold=fold, is_oos=(fold == 1) & (np.arange(10) > 2), values=values)
    with pytest.raises(DataError, match="exactly one whole fold"):
        combine_folds([paths[0], partial], **opts)


# --- summaries ----------------------------------------------------------------------------------------


def test_spread_summary():
    s = spread_summary(np.array([1.0, 2.0, 3.0, 4.0, 5.0, np.nan]))
    assert s["n"] == 6 and s["n_nan"] == 1 and s["p50"] == 3 and s["iqr"] == 2 and s["range"] == 4
    assert s["std"] == pytest.approx(np.sqrt(2)) and s["p5_p95"] == pytest.approx(3.6)
    assert np.isnan(spread_summary(np.array([np.nan]))["mean"])


def test_rankdata_averages_ties():
    np.testing.assert_array_equal(rankdata(np.array([10, 20, 10, 30, 20])), [1.5, 3.5, 1.5, 5, 3.5])


def test_auroc_by_hand_and_against_pair_counting():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool)) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1], bool)) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1], bool)) == 0.5
    g = np.random.default_rng(0)
    s = g.integers(0, 5, 60).astype(float)  # many ties
    pos = g.random(60) < 0.3
    diff = s[pos][:, None] - s[~pos][None, :]
    assert auroc(s, pos) == pytest.approx(((diff > 0) + 0.5 * (diff == 0)).mean())
    with pytest.raises(ValueError, match="both"):
        auroc(s, np.zeros(60, bool))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([np.nan, 1.0]), np.array([0, 1], bool))
