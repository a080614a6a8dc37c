"""The ssl_train stage's checks on the labeled subset."""

import numpy as np
import pytest

from semiprune_core.errors import DataError
from tasks.ssl_train import check_labeled_subset


def test_no_labeled_samples():
    with pytest.raises(DataError, match="no labeled samples"):
        check_labeled_subset(np.array([], dtype=int), 10, ["a", "b"])


def test_a_class_without_labels_is_named():
    with pytest.raises(DataError, match="class 'b' has no labeled sample"):
        check_labeled_subset(np.array([0, 0, 2]), 10, ["a", "b", "c"])


def test_labeled_subset_larger_than_pool():
    with pytest.raises(DataError, match="larger than the train pool"):
        check_labeled_subset(np.array([0, 1, 0, 1]), 3, ["a", "b"])


def test_a_proper_subset_passes():
    check_labeled_subset(np.array([0, 1]), 10, ["a", "b"])
