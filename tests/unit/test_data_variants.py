"""The synthetic source and the benchmark variants (subsample, long_tail, corrupt)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semiprune_core.data import UNLABELED, corrupt, long_tail, long_tail_counts, make_synthetic, subsample
from semiprune_core.data.variants import stratified_choice
from semiprune_core.errors import DataError
from semiprune_core.seeding import rng


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(seed=3, n_train=600, n_test=200, n_classes=6, image_size=16, channels=1)


@pytest.fixture(scope="module")
def clean():
    """Balanced reference labels (no mislabeled rows): 100 train and 20 test per class."""
    return make_synthetic(seed=4, n_train=600, n_test=120, n_classes=6, image_size=16, mislabeled_share=0)


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_same_seed_is_byte_identical_other_seed_differs():
    a = make_synthetic(seed=1, n_train=300, n_test=50)
    b = make_synthetic(seed=1, n_train=300, n_test=50)
    c = make_synthetic(seed=2, n_train=300, n_test=50)
    assert a.images.tobytes() == b.images.tobytes()
    np.testing.assert_array_equal(a.true_labels, b.true_labels)
    for k in a.hidden:
        np.testing.assert_array_equal(a.hidden[k], b.hidden[k])
    assert a.images.tobytes() != c.images.tobytes()
    # the test split has its own stream: changing n_test leaves train untouched
    d = make_synthetic(seed=1, n_train=300, n_test=80)
    assert d.images[:300].tobytes() == a.images[:300].tobytes()


def test_synthetic_structure(synth):
    train = synth.split == "train"
    assert synth.images.shape == (800, 1, 16, 16) and synth.images.dtype == np.uint8
    assert synth.classes == [f"class_{c}" for c in range(6)]
    assert (synth.labels[train] == UNLABELED).all() and (synth.labels[~train] == synth.true_labels[~train]).all()
    wrong = synth.hidden["is_mislabeled"]
    assert wrong.sum() == round(0.05 * 600) and not wrong[~train].any()
    assert (synth.true_labels[wrong] != synth.hidden["clean_label"][wrong]).all()
    assert (synth.true_labels[~wrong] == synth.hidden["clean_label"][~wrong]).all()
    assert synth.hidden["is_ambiguous"][train].sum() == 60 and synth.hidden["is_ambiguous"][~train].sum() == 20
    assert np.bincount(synth.hidden["clean_label"][train]).tolist() == [100] * 6


def test_synthetic_is_learnable_at_defaults():
    """A nearest-centroid classifier on raw pixels is far above chance (10%) on the test split."""
    pool = make_synthetic(seed=0, n_train=2000, n_test=500)
    x = pool.images.reshape(len(pool), -1).astype(np.float32)
    train = pool.split == "train"
    centroids = np.stack([x[train][pool.true_labels[train] == c].mean(0) for c in range(10)])
    pred = ((x[~train, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == pool.true_labels[~train]).mean() > 0.8


def test_separation_controls_difficulty():
    def accuracy(separation):
        pool = make_synthetic(seed=0, n_train=1000, n_test=500, separation=separation, ambiguous_share=0)
        x = pool.images.reshape(len(pool), -1).astype(np.float32)
        tr = pool.split == "train"
        cent = np.stack([x[tr][pool.true_labels[tr] == c].mean(0) for c in range(10)])
        return (((x[~tr, None] - cent[None]) ** 2).sum(-1).argmin(1) == pool.true_labels[~tr]).mean()

    assert accuracy(0.15) + 0.1 < accuracy(1.0)


# ---------------------------------------------------------------------------------------- subsample


def test_subsample_is_stratified_ordered_and_recorded(clean):
    out = subsample(clean, n_train=300, n_test=60, seed=0)
    train = out.split == "train"
    assert train.sum() == 300 and (~train).sum() == 60
    assert np.bincount(out.true_labels[train]).tolist() == [50] * 6
    assert np.bincount(out.true_labels[~train], minlength=6).tolist() == [10] * 6
    position = {sid: i for i, sid in enumerate(clean.sample_ids)}
    order = np.array([position[sid] for sid in out.sample_ids])
    assert (np.diff(order) > 0).all(), "original order is kept"
    assert out.info["variants"] == [{"name": "subsample", "train": 300, "test": 60}]
    for k in clean.hidden:
        np.testing.assert_array_equal(out.hidden[k], clean.hidden[k][order])
    again = subsample(clean, n_train=300, n_test=60, seed=0)
    np.testing.assert_array_equal(again.sample_ids, out.sample_ids)
    assert "variants" not in clean.info, "the input pool is not changed"


def test_subsample_unlabeled_rows_are_their_own_stratum(clean):
    real = replace(clean, true_labels=None, labels=np.where(np.arange(len(clean)) % 3 == 0, clean.true_labels, -1))
    out = subsample(real, n_train=300, seed=1)
    tr = out.split == "train"
    assert (out.labels[tr] == UNLABELED).sum() == 200 and (out.split == "test").sum() == 120


def test_subsample_more_than_exist_is_an_error(clean):
    with pytest.raises(DataError, match="asks for 601 train samples but the pool has 600"):
        subsample(clean, n_train=601, seed=0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-1, 4), min_size=1, max_size=60), st.data())
def test_stratified_choice_allocates_proportionally(strata, data):
    strata = np.array(strata)
    n = data.draw(st.integers(0, len(strata)))
    picked = stratified_choice(strata, n, rng(0, "t"))
    assert len(picked) == n and (np.diff(picked) > 0).all()
    for s in np.unique(strata):
        expected = n * (strata == s).sum() / len(strata)
        assert abs((strata[picked] == s).sum() - expected) < 1


# ---------------------------------------------------------------------------------------- long_tail


def test_long_tail_follows_the_exponential_profile(clean):
    out = long_tail(clean, imbalance=0.1, seed=0)
    train = out.split == "train"
    expected = [int(100 * 0.1 ** (c / 5) + 1e-9) for c in range(6)]
    assert expected == [100, 63, 39, 25, 15, 10]
    assert np.bincount(out.true_labels[train]).tolist() == expected
    np.testing.assert_array_equal(out.sample_ids[~train], clean.sample_ids[clean.split == "test"])
    assert out.info["variants"][-1]["class_counts"] == expected


def test_long_tail_counts_cap_at_class_size_and_keep_one():
    assert long_tail_counts(np.array([10, 3, 10]), imbalance=0.5).tolist() == [10, 3, 5]
    assert long_tail_counts(np.array([5, 5]), imbalance=0.01).tolist() == [5, 1]


def test_long_tail_one_is_a_no_op(clean):
    assert long_tail(clean, imbalance=1.0, seed=0) is clean


def test_long_tail_refuses_unlabeled_rows(clean):
    real = replace(clean, true_labels=None, labels=np.full(len(clean), -1))
    with pytest.raises(DataError, match="long_tail needs a label on every train sample"):
        long_tail(real, imbalance=0.1, seed=0)


# ---------------------------------------------------------------------------------------- corrupt


def test_corrupt_share_flags_and_only_flagged_rows_change(clean):
    before = clean.images.copy()
    out = corrupt(clean, share=0.25, kinds=["noise", "blur", "occlusion", "contrast"], severity=3, seed=0)
    flagged = out.flags["is_corrupted"]
    assert flagged.sum() == 150 and not flagged[clean.split == "test"].any()
    kinds, counts = np.unique(out.flags["corruption"][flagged], return_counts=True)
    assert kinds.tolist() == ["blur", "contrast", "noise", "occlusion"] and counts.tolist() == [38, 37, 38, 37]
    assert (out.flags["corruption"][~flagged] == "").all()
    changed = (out.images != clean.images).reshape(len(out), -1).any(1)
    assert not changed[~flagged].any() and changed[flagged].mean() > 0.95
    np.testing.assert_array_equal(clean.images, before)
    assert "is_corrupted" not in clean.flags
    assert out.info["variants"] == [{"name": "corrupt", "share": 0.25, "kinds": ["noise", "blur", "occlusion",
                                     "contrast"], "severity": 3, "count": 150}]
    again = corrupt(clean, share=0.25, kinds=["noise", "blur", "occlusion", "contrast"], severity=3, seed=0)
    assert again.images.tobytes() == out.images.tobytes()


@pytest.mark.parametrize("kind", ["noise", "blur", "occlusion", "contrast"])
def test_each_corruption_does_what_it_says_and_grows_with_severity(clean, kind):
    x = clean.images.astype(float)

    def effect(severity):
        out = corrupt(clean, share=1.0, kinds=[kind], severity=severity, seed=0)
        y = out.images.astype(float)
        rows = out.split == "train"
        if kind == "noise":
            return np.abs(y - x)[rows].mean()
        if kind == "blur":  # neighbouring pixels become alike
            return -np.abs(np.diff(y[rows], axis=-1)).mean()
        if kind == "contrast":
            return -y[rows].std(axis=(1, 2, 3)).mean()
        # occlusion: a constant rectangle; count pixels equal to the row's fill value that differ from x
        return (y != x)[rows].mean()

    assert effect(1) < effect(5)
    base = {"noise": 0, "blur": -np.abs(np.diff(x[clean.split == "train"], axis=-1)).mean(),
            "contrast": -x[clean.split == "train"].std(axis=(1, 2, 3)).mean(), "occlusion": 0}[kind]
    assert effect(1) > base


def test_occlusion_is_a_filled_rectangle(clean):
    out = corrupt(clean, share=0.1, kinds=["occlusion"], severity=5, seed=4)
    i = np.flatnonzero(out.flags["is_corrupted"])[0]
    diff = out.images[i, 0] != clean.images[i, 0]
    rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
    box = out.images[i, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert (box == box[0, 0]).all() and box.shape == (6, 6)  # round(0.4 * 16)


def test_corrupt_zero_share_is_a_no_op_and_bad_kind_an_error(clean):
    assert corrupt(clean, share=0.0, seed=0) is clean
    with pytest.raises(DataError, match="unknown corruption 'rain'"):
        corrupt(clean, share=0.1, kinds=["rain"], seed=0)
