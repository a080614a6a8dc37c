"""Stratified, seeded K-fold assignment for out-of-sample scoring."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semiprune_core.data.folds import assign_folds
from semiprune_core.errors import ConfigError, DataError


def test_stratified_balanced_and_seeded():
    y = np.repeat(np.arange(4), [10, 7, 23, 5])
    folds = assign_folds(y, k=3, seed=0)
    assert folds.dtype == np.int8 and folds.shape == y.shape and set(folds) == {0, 1, 2}
    for c in range(4):
        counts = np.bincount(folds[y == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    sizes = np.bincount(folds, minlength=3)
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(folds, assign_folds(y, k=3, seed=0))
    assert not np.array_equal(folds, assign_folds(y, k=3, seed=1))


def test_order_of_samples_within_a_class_is_shuffled():
    y = np.zeros(100, int)
    folds = assign_folds(y, k=2, seed=0)
    assert not np.array_equal(folds, np.arange(100) % 2) and not np.array_equal(folds, 1 - np.arange(100) % 2)


def test_absent_classes_are_ignored():
    y = np.array([0, 0, 2, 2, 0, 2])  # class 1 has no sample
    assert set(assign_folds(y, k=2, seed=0)) == {0, 1}


@pytest.mark.parametrize("k", [1, 0, -2, 128, 2.5, True])
def test_bad_k_is_a_config_error(k):
    with pytest.raises(ConfigError, match="folds k"):
        assign_folds(np.zeros(10, int), k=k, seed=0)


def test_class_smaller_than_k_names_the_class():
    y = np.array([0] * 10 + [1] * 3)
    with pytest.raises(DataError, match=r"class 'Bag' has 3 sample\(s\), fewer than k=5 folds; lower k"):
        assign_folds(y, k=5, seed=0, classes=["T-shirt", "Bag"])
    with pytest.raises(DataError, match="class '1' has 3"):
        assign_folds(y, k=5, seed=0)


@pytest.mark.parametrize("targets, match", [
    (np.array([], int), "empty pool"),
    (np.array([0, -1, 1, 1, 0]), "negative"),
    (np.array([0.0, 1.0]), "integer"),
    (np.zeros((2, 2), int), "1-D"),
])
def test_bad_targets_are_data_errors(targets, match):
    with pytest.raises(DataError, match=match):
        assign_folds(targets, k=2, seed=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=200), st.integers(2, 6), st.integers(0, 2**31))
def test_every_class_spread_evenly(labels, k, seed):
    y = np.array(labels)
    if np.bincount(y)[np.unique(y)].min() < k:
        with pytest.raises(DataError, match="fewer than k"):
            assign_folds(y, k=k, seed=seed)
        return
    folds = assign_folds(y, k=k, seed=seed)
    sizes = np.bincount(folds, minlength=k)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    for c in np.unique(y):
        counts = np.bincount(folds[y == c], minlength=k)
        assert counts.max() - counts.min() <= 1
