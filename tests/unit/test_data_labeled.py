"""Choosing the labeled subset: per_class, fraction, count, all; and the errors a user can hit."""

from __future__ import annotations

import numpy as np
import pytest

from semiprune_core.data import choose_labeled
from semiprune_core.errors import DataError

# class sizes 30, 20, 10; plus 5 unlabeled rows, shuffled
REF = np.random.default_rng(0).permutation(np.r_[np.zeros(30), np.ones(20), np.full(10, 2), np.full(5, -1)]).astype(int)
NAMES = ["cat", "dog", "emu"]


def per_class_counts(mask):
    return np.bincount(REF[mask], minlength=3).tolist()


def test_per_class_is_exact_seeded_and_nested():
    a = choose_labeled(REF, per_class=4, seed=0, classes=NAMES)
    assert per_class_counts(a) == [4, 4, 4] and not a[REF < 0].any()
    np.testing.assert_array_equal(a, choose_labeled(REF, per_class=4, seed=0, classes=NAMES))
    assert not np.array_equal(a, choose_labeled(REF, per_class=4, seed=1, classes=NAMES))
    bigger = choose_labeled(REF, per_class=5, seed=0, classes=NAMES)
    assert (bigger[a]).all(), "a larger budget keeps the smaller selection"


def test_fraction_rounds_per_class_with_at_least_one():
    assert per_class_counts(choose_labeled(REF, fraction=0.25, seed=0)) == [8, 5, 3]  # halves round up
    assert per_class_counts(choose_labeled(REF, fraction=0.01, seed=0)) == [1, 1, 1]


def test_count_splits_evenly_with_random_remainder():
    for seed in range(5):
        counts = per_class_counts(choose_labeled(REF, count=11, seed=seed))
        assert sum(counts) == 11 and sorted(counts) == [3, 4, 4]
    leftovers = {tuple(per_class_counts(choose_labeled(REF, count=10, seed=s))) for s in range(12)}
    assert len(leftovers) > 1, "the remainder goes to classes drawn at random"


def test_none_set_takes_every_labeled_row():
    mask = choose_labeled(REF, seed=0)
    np.testing.assert_array_equal(mask, REF >= 0)


def test_budget_larger_than_a_class_names_it():
    with pytest.raises(DataError, match=r"per_class=11 asks for 11 labels of class 'emu', which has only 10"):
        choose_labeled(REF, per_class=11, seed=0, classes=NAMES)
    with pytest.raises(DataError, match=r"class 'emu', which has only 10"):
        choose_labeled(REF, count=36, seed=0, classes=NAMES)


def test_class_without_any_sample_or_label_is_an_error():
    with pytest.raises(DataError, match=r"class 'fox', which has only 0"):
        choose_labeled(REF, per_class=1, seed=0, classes=[*NAMES, "fox"])
    with pytest.raises(DataError, match=r"class 'fox' has no labeled sample"):
        choose_labeled(REF, seed=0, classes=[*NAMES, "fox"])
    with pytest.raises(DataError, match=r"has no labeled sample .*raise the label budget"):
        choose_labeled(REF, count=2, seed=0, classes=NAMES)


def test_no_labels_at_all_and_two_options_are_errors():
    with pytest.raises(DataError, match="no train sample has a label"):
        choose_labeled(np.full(5, -1), seed=0, classes=NAMES)
    with pytest.raises(DataError, match="set only one of per_class, fraction, count"):
        choose_labeled(REF, per_class=1, count=3, seed=0)
