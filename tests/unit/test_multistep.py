"""Multi-step UNSEEN selection with stand-in scorers: budgets, steps, unseen scoring, class quotas."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semiprune_core.errors import ConfigError
from semiprune_core.selection.multistep import multistep_select, proportional_quotas
from semiprune_core.selection.strategies import REASONS


def pool(n=300, classes=3, seeds=12, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    is_seed = np.zeros(n, bool)
    is_seed[rng.choice(n, seeds, replace=False)] = True
    return rng.normal(size=n), targets, is_seed


def test_each_step_scores_only_what_its_scorer_never_trained_on_and_the_budget_is_exact():
    h, targets, is_seed = pool()
    calls = []

    def scorer(step, coreset, candidates):
        assert not set(coreset) & set(candidates) and len(coreset) + len(candidates) == len(h)
        calls.append((step, len(coreset), len(candidates)))
        return -h[candidates], np.full(3, 0.5)  # a scorer that disagrees with step 1

    sel = multistep_select(base="easy", steps=3, hardness=h, targets=targets, is_seed=is_seed, ratio=0.5,
                           rng=np.random.default_rng(1), scorer=scorer)
    assert sel.n_kept == 150 and sel.is_kept[is_seed].all()
    assert [c[:2] for c in calls] == [(2, 50), (3, 100)]
    assert sorted(set(sel.stratum[sel.is_kept])) == [1, 2, 3] and (sel.stratum[~sel.is_kept] == -1).all()
    assert [(sel.stratum == t).sum() for t in (1, 2, 3)] == [50, 50, 50]
    step2 = np.flatnonzero(sel.stratum == 2)  # the easiest by step 2's scorer among what step 1 left
    left = np.flatnonzero(sel.stratum != 1)
    assert set(step2) == set(left[np.argsort(-h[left], kind="stable")[:50]])


def test_class_aware_steps_follow_the_scorers_error_per_class():
    h, targets, is_seed = pool(n=600, seeds=0)

    def scorer(step, coreset, candidates):
        return h[candidates], np.array([0.0, 0.25, 0.75])  # class 2 is where the scorer errs most

    sel = multistep_select(base="random", steps=2, hardness=h, targets=targets, is_seed=is_seed, ratio=0.5,
                           rng=np.random.default_rng(0), scorer=scorer, class_aware=True, num_classes=3)
    added = np.bincount(targets[sel.stratum == 2], minlength=3)
    assert added.tolist() == [0, 37, 113] and sel.n_kept == 300
    quota0 = sel.reason[(sel.stratum != 1) & (targets == 0)]
    assert set(quota0) == {REASONS["quota_pruned"].format(step=2)}


@given(st.lists(st.floats(0, 1), min_size=1, max_size=8), st.lists(st.integers(0, 40), min_size=8, max_size=8),
       st.integers(0, 200))
@settings(max_examples=300, deadline=None)
def test_proportional_quotas_fill_exactly_and_never_exceed_a_class(weights, available, n):
    available = np.array(available[: len(weights)])
    quotas = proportional_quotas(np.array(weights), available, n)
    assert quotas.sum() == min(n, available.sum()) and (quotas <= available).all() and (quotas >= 0).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"base": "dual_beta"}, "cannot step with 'dual_beta'"),
    ({"steps": 1}, "at least 2 steps"),
    ({"steps": 400}, "cannot each add samples"),
])
def test_bad_multistep_settings_are_refused(kwargs, message):
    h, targets, is_seed = pool()
    args = {"base": "easy", "steps": 3} | kwargs
    with pytest.raises(ConfigError, match=message):
        multistep_select(hardness=h, targets=targets, is_seed=is_seed, ratio=0.5, rng=np.random.default_rng(0),
                         scorer=lambda *a: None, **args)
