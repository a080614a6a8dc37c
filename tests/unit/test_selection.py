"""Coreset selection: the budget, the seed set, class quotas and each strategy's own rule."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semiprune_core.errors import ConfigError, DataError
from semiprune_core.selection import REASONS, STRATEGIES, budget, class_quotas, hardness, select
from semiprune_core.selection.strategies import auto_cutoff

TEMPLATES = [re.compile("^" + re.escape(r).replace(r"\{stratum\}", r"\d+").replace(r"\{strata\}", r"\d+") + "$")
             for r in REASONS.values()]


def pool(n: int, classes: int, seed: int = 0, seed_share: float = 0.05):
    g = np.random.default_rng(seed)
    targets = np.arange(n) % classes  # every class present
    g.shuffle(targets)
    return {
        "hardness": g.normal(size=n),
        "targets": targets,
        "is_seed": g.random(n) < seed_share,
        "dual": g.random(n),
        "prob_mean": g.random(n),
        "features": g.normal(size=(n, 4)),
    }


def run(strategy, p, ratio, seed=0, **kw):
    kw.setdefault("cutoff", 0.1)
    kw.setdefault("strata", 7)
    return select(strategy, hardness=p["hardness"], targets=p["targets"], is_seed=p["is_seed"], ratio=ratio,
                  rng=np.random.default_rng(seed), dual=p["dual"], prob_mean=p["prob_mean"], features=p["features"],
                  clusters=3, c_d=4.0, **kw)


@settings(max_examples=60, deadline=None)
@given(
    strategy=st.sampled_from(sorted(STRATEGIES)),
    n=st.integers(40, 300),
    classes=st.integers(2, 6),
    ratio=st.floats(0.05, 0.85),
    class_balance=st.booleans(),
    min_per_class=st.integers(0, 3),
    keep_labeled=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_every_strategy_meets_the_budget_keeps_seeds_and_holds_quotas(
    strategy, n, classes, ratio, class_balance, min_per_class, keep_labeled, seed
):
    p = pool(n, classes, seed)
    want = math.floor((1 - ratio) * n + 1e-9)
    seeds_per_class = np.bincount(p["targets"][p["is_seed"] & keep_labeled], minlength=classes)
    args = dict(class_balance=class_balance, min_per_class=min_per_class, keep_labeled=keep_labeled,
                cutoff=0.0 if ratio < 0.15 else 0.1)
    if np.maximum(seeds_per_class, min_per_class).sum() > want:  # seeds + class minimums exceed the budget
        with pytest.raises(ConfigError, match="seed set|class minimums"):
            run(strategy, p, ratio, seed, **args)
        return
    sel = run(strategy, p, ratio, seed, **args)
    assert sel.is_kept.dtype == bool and sel.n_kept == want  # exact budget; a mask cannot pick twice
    if keep_labeled:
        assert sel.is_kept[p["is_seed"]].all()
        assert set(sel.reason[p["is_seed"]]) <= {REASONS["seed"]}
    kept_per_class = np.bincount(p["targets"][sel.is_kept], minlength=classes)
    assert (kept_per_class >= min_per_class).all()
    if class_balance:
        counts = np.bincount(p["targets"], minlength=classes)
        floor = np.maximum(np.bincount(p["targets"][p["is_seed"] & keep_labeled], minlength=classes), min_per_class)
        np.testing.assert_array_equal(kept_per_class, class_quotas(counts, want, floor))
    assert all(any(t.match(r) for t in TEMPLATES) for r in set(sel.reason))
    kept_reasons = {r.split(":")[0] for r in sel.reason[sel.is_kept]}
    assert kept_reasons == {"kept"} and {r.split(":")[0] for r in sel.reason[~sel.is_kept]} <= {"pruned"}
    assert sorted(sel.rank) == list(range(n))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_the_same_seed_gives_the_same_selection_and_another_seed_may_not(strategy):
    p = pool(500, 4)
    a, b = run(strategy, p, 0.6, seed=1), run(strategy, p, 0.6, seed=1)
    np.testing.assert_array_equal(a.is_kept, b.is_kept)
    np.testing.assert_array_equal(a.reason, b.reason)
    if strategy == "random":
        assert not np.array_equal(a.is_kept, run(strategy, p, 0.6, seed=2).is_kept)


def test_easy_and_hard_keep_the_ends_of_the_ranking():
    p = pool(100, 2, seed_share=0)
    p["hardness"] = np.arange(100.0)
    easy, hard = run("easy", p, 0.7), run("hard", p, 0.7)
    assert np.flatnonzero(easy.is_kept).tolist() == list(range(30))
    assert np.flatnonzero(hard.is_kept).tolist() == list(range(70, 100))
    assert set(hard.reason[~hard.is_kept]) == {REASONS["hard_pruned"]}


def test_aum_cutoff_keeps_the_window_after_the_hardest():
    p = pool(100, 2, seed_share=0)
    aum = np.linspace(-5, 5, 100)  # higher AUM = easier
    p["hardness"] = hardness("oos_aum", aum)
    sel = run("aum_cutoff", p, 0.5, cutoff=0.2)
    assert np.flatnonzero(sel.is_kept).tolist() == list(range(20, 70))
    assert set(sel.reason[:20]) == {REASONS["cutoff_pruned"]}
    assert set(sel.reason[70:]) == {REASONS["hard_pruned"]}
    assert sel.rank[99] == 0 and sel.rank[0] == 99  # rank 0 = easiest


def test_a_cutoff_that_leaves_too_little_to_keep_is_an_error():
    p = pool(100, 2, seed_share=0)
    with pytest.raises(ConfigError, match="cutoff 0.6 drops 60 of 100"):
        run("aum_cutoff", p, 0.5, cutoff=0.6)
    with pytest.raises(ConfigError, match="cutoff"):
        run("ccs", p, 0.3, cutoff=0.5)


def test_the_auto_cutoff_follows_the_published_schedule_and_always_leaves_the_budget():
    for pruned, m in ((0.3, 0.0), (0.5, 0.2), (0.7, 0.5), (0.8, 0.6), (0.9, 0.7)):
        assert auto_cutoff(pruned) == pytest.approx(m)
    assert auto_cutoff(0.6) == pytest.approx(0.35)  # between two published points
    assert auto_cutoff(0.05) == 0.0 and auto_cutoff(0.99) == pytest.approx(0.7)
    ratios = np.linspace(0.01, 0.99, 99)
    cut = [auto_cutoff(r) for r in ratios]
    assert all(b >= a for a, b in zip(cut, cut[1:]))  # a smaller coreset never keeps more of the hardest
    p = pool(1000, 4, seed_share=0)
    for r in ratios:  # kept share + cutoff stays below 1, so aum_cutoff always finds its window
        assert run("aum_cutoff", p, float(r), cutoff=auto_cutoff(float(r))).is_kept.sum() == budget(1000, float(r))


def test_ccs_spreads_the_budget_over_strata_from_the_smallest_up():
    p = pool(1000, 2, seed_share=0)
    g = np.random.default_rng(0)
    # a skewed score: most samples easy, a thin tail of hard ones
    p["hardness"] = np.concatenate([g.uniform(0, 1, 900), g.uniform(1, 10, 100)])
    sel = run("ccs", p, 0.8, cutoff=0.0, strata=10)
    kept_strata = np.bincount(sel.stratum[sel.is_kept], minlength=10)
    all_strata = np.bincount(sel.stratum, minlength=10)
    assert sel.n_kept == 200
    # small strata are kept whole; the big easy stratum gets only the rest
    small = all_strata <= 200 // 10
    np.testing.assert_array_equal(kept_strata[small], all_strata[small])
    assert kept_strata[0] < all_strata[0] / 2
    assert all(r.startswith(("kept: drawn in stratum", "pruned: not drawn in stratum")) for r in sel.reason)


def test_dual_beta_never_draws_a_zero_weight_sample_while_weighted_ones_remain():
    p = pool(300, 3, seed_share=0)
    p["dual"][:150] = 0.0
    sel = run("dual_beta", p, 0.6)
    assert not sel.is_kept[:150].any()


def test_prototypicality_keeps_the_samples_farthest_from_their_cluster():
    g = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    feats = np.concatenate([c + g.normal(size=(50, 2)) for c in centres])
    outliers = np.array([7, 60, 120])
    feats[outliers] += 6.0
    p = pool(150, 3, seed_share=0)
    p["features"] = feats
    sel = run("prototypicality", p, 0.98)
    assert set(np.flatnonzero(sel.is_kept)) == set(outliers)
    assert len(set(sel.stratum)) == 3


def test_never_learned_samples_rank_hardest_by_forgetting():
    h = hardness("oos_forgetting", np.array([0.0, 2.0, np.nan, 1.0]))
    assert h.argmax() == 2 and np.isfinite(h).all()


def test_a_nan_score_is_an_error_that_names_the_score():
    with pytest.raises(DataError, match="'oos_el2n' is NaN for 1 samples"):
        hardness("oos_el2n", np.array([0.1, np.nan]))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_a_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ConfigError, match="pruning ratio must be in"):
        budget(100, ratio)


def test_unknown_strategy_lists_the_valid_ones():
    p = pool(50, 2)
    with pytest.raises(ConfigError, match="unknown selection strategy 'greedy'.*random, easy, hard, ccs, aum_cutoff"):
        run("greedy", p, 0.5)


def test_a_class_smaller_than_its_minimum_is_an_error():
    p = pool(50, 2)
    p["targets"][:] = 0
    p["targets"][:3] = 1
    with pytest.raises(DataError, match="class 'cat' has 3 samples, fewer than select.min_per_class=5"):
        select("random", hardness=p["hardness"], targets=p["targets"], is_seed=p["is_seed"], ratio=0.5,
               rng=np.random.default_rng(0), min_per_class=5, class_names=["dog", "cat"])


def test_a_seed_set_larger_than_the_budget_is_an_error():
    p = pool(100, 2)
    p["is_seed"][:] = True
    with pytest.raises(ConfigError, match="seed set"):
        run("random", p, 0.5)
    assert run("random", p, 0.5, keep_labeled=False).n_kept == 50


def test_class_quotas_water_fill_equal_shares():
    np.testing.assert_array_equal(class_quotas(np.array([5, 100, 100]), 65, np.zeros(3, int)), [5, 30, 30])
    np.testing.assert_array_equal(class_quotas(np.array([50, 50]), 7, np.zeros(2, int)), [4, 3])
