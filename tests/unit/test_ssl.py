"""Semi-supervised objectives, threshold policies and pseudo-label tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semiprune_core.errors import ConfigError
from semiprune_core.models import create_model
from semiprune_core.ssl import (
    FixedThreshold, FlexMatchThreshold, FreeMatchThreshold, SemiSupervisedObjective, accuracy_report, make_policy,
    pseudo_labels,
)
from semiprune_core.training.engine import Schedule, evaluate, fit


def blobs(n_per_class: int, *, classes: int = 3, size: int = 12, seed: int = 0):
    """Images whose class is the position of a bright square, plus noise."""
    g = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    images = g.integers(0, 60, size=(len(labels), 1, size, size))
    for c in range(classes):
        r = 1 + 3 * c
        images[labels == c, :, r : r + 3, 2:9] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels


def test_fixed_threshold_masks_by_confidence():
    probs = torch.tensor([[0.96, 0.04], [0.6, 0.4], [0.05, 0.95]])
    assert FixedThreshold(0.95).mask(probs, torch.arange(3)).tolist() == [1.0, 0.0, 1.0]
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ConfigError, match="threshold"):
            FixedThreshold(bad)


def test_flexmatch_lowers_thresholds_for_classes_learned_least():
    policy = FlexMatchThreshold(0.9, n_unlabeled=6, num_classes=2)
    # Rows 0-3 confidently predicted as class 0: class 0 is "learned", class 1 is not.
    policy.mask(torch.tensor([[0.99, 0.01]] * 4), torch.arange(4))
    assert policy.selected.tolist() == [0, 0, 0, 0, -1, -1]
    mask = policy.mask(torch.tensor([[0.8, 0.2], [0.2, 0.8]]), torch.tensor([4, 5]))
    # class 0 threshold = 0.9 * M(1) = 0.9 > 0.8 -> rejected; class 1 threshold = 0.9 * M(0) = 0 -> kept
    assert mask.tolist() == [0.0, 1.0]


def test_freematch_threshold_adapts_to_confidence_and_round_trips_state():
    policy = FreeMatchThreshold(num_classes=2, momentum=0.5)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    mask = policy.mask(probs, torch.arange(2))
    assert policy.tau_t.item() == pytest.approx(0.5 * 0.5 + 0.5 * 0.85)
    assert mask.tolist() == [1.0, 1.0]
    clone = FreeMatchThreshold(num_classes=2, momentum=0.5)
    clone.load_state_dict(policy.state_dict())
    assert torch.equal(clone.p_t, policy.p_t) and torch.equal(clone.tau_t, policy.tau_t)


def test_make_policy_names():
    assert make_policy("supervised", threshold=0.9, num_classes=3, n_unlabeled=5) is None
    assert isinstance(make_policy("flexmatch", threshold=0.9, num_classes=3, n_unlabeled=5), FlexMatchThreshold)
    with pytest.raises(ConfigError, match="unknown SSL algorithm"):
        make_policy("mixmatch", threshold=0.9, num_classes=3, n_unlabeled=5)


def test_objective_batches_have_mu_times_more_unlabeled_and_count_sample_passes():
    images, labels = blobs(20)
    obj = SemiSupervisedObjective(images[:6], labels[:6], images[6:], policy=FixedThreshold(0.95), mu=3)
    g = torch.Generator().manual_seed(0)
    batches = list(obj.batches(0, 4, g))
    assert len(batches) == obj.steps_per_epoch(4) == 5  # ceil(54 / 12)
    seen = torch.cat([b.unlabeled_rows for b in batches])
    assert sorted(seen.tolist()) == list(range(54)), "each unlabeled sample exactly once per epoch"
    b = batches[0]
    assert b.labeled.shape[0] == 4 and b.weak.shape == b.strong.shape and not torch.equal(b.weak, b.strong)
    model = create_model("mlp", in_channels=1, num_classes=3, image_size=12, seed=0)
    out = obj.loss(model, b)
    assert out.n_samples == 4 + 2 * len(b.weak) and {"mask_rate", "confident_rate"} <= set(out.stats)


def test_bad_objective_options_are_config_errors():
    images, labels = blobs(4)
    with pytest.raises(ConfigError, match="no labeled"):
        SemiSupervisedObjective(images[:0], labels[:0], images, policy=None)
    with pytest.raises(ConfigError, match="mu"):
        SemiSupervisedObjective(images, labels, images, policy=None, mu=0)


def test_fixmatch_uses_the_pool_and_beats_supervised_on_few_labels():
    images, labels = blobs(150, seed=1)
    test_images, test_labels = blobs(50, seed=2)
    g = np.random.default_rng(0)
    lab = np.zeros(len(labels), bool)
    for c in range(3):
        lab[g.choice(np.flatnonzero(labels == c), 2, replace=False)] = True
    accs = {}
    for name in ("supervised", "fixmatch"):
        policy = make_policy(name, threshold=0.8, num_classes=3, n_unlabeled=int((~lab).sum()))
        obj = SemiSupervisedObjective(images[lab], labels[lab], images[~lab], policy=policy, mu=4)
        model = create_model("fastcnn", in_channels=1, num_classes=3, image_size=12, seed=0, widths=(8, 16))
        res = fit(model, obj, Schedule(epochs=8, batch_size=6, lr=0.05, ema_decay=0.9), seed=0, device="cpu")
        accs[name] = evaluate(res.final_model, test_images, test_labels)
        if name == "fixmatch":
            assert res.history[-1]["mask_rate"] > 0.2, "confident pseudo-labels should appear"
    assert accs["fixmatch"] >= accs["supervised"]
    assert accs["fixmatch"] > 0.6


def test_pseudo_labels_human_labels_win():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.4, 0.5, 0.1]])
    out = pseudo_labels(probs, human_labels=np.array([-1, 0, -1]))
    assert out["pseudo_label"].tolist() == [0, 2, 1]
    assert out["target"].tolist() == [0, 0, 1]
    assert out["label_source"].tolist() == ["pseudo", "human", "pseudo"]
    np.testing.assert_allclose(out["confidence"], [0.7, 0.8, 0.5])
    np.testing.assert_allclose(out["margin"], [0.5, 0.7, 0.1])
    np.testing.assert_allclose(out["entropy"][1], -(2 * 0.1 * np.log(0.1) + 0.8 * np.log(0.8)))


def test_accuracy_report_per_class_and_bucket():
    report = accuracy_report(np.array([0, 1, 1, 0]), np.array([0.99, 0.6, 0.97, 0.4]), np.array([0, 1, 0, 1]),
                             num_classes=2, buckets=(0.0, 0.5, 0.9, 1.01))
    assert report["accuracy"] == 0.5
    assert report["per_class"]["0"] == {"n": 2, "accuracy": 0.5}
    assert [b["n"] for b in report["by_confidence"]] == [1, 1, 2]
    assert [b["accuracy"] for b in report["by_confidence"]] == [0.0, 1.0, 0.5]


def test_the_oracle_targets_are_the_true_labels():
    from semiprune_core.ssl.pseudo_labels import ORACLE, oracle_labels

    cols = oracle_labels(np.array([3, 1, 2]))
    assert cols["target"].tolist() == [3, 1, 2] and set(cols["label_source"]) == {ORACLE}
    assert (cols["confidence"] == 1).all()


def test_label_free_clusters_recover_well_separated_groups_without_labels():
    from semiprune_core.ssl.pseudo_labels import CLUSTER, cluster_labels

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), 40)
    images = np.clip(groups[:, None] * 100 + rng.normal(0, 5, (120, 16)), 0, 255).astype(np.uint8).reshape(120, 1, 4, 4)
    cols = cluster_labels(images, 3, np.random.default_rng(1), dims=4)
    assert set(cols["label_source"]) == {CLUSTER} and cols["target"].shape == (120,)
    # the same cluster for every member of a group, a different one per group
    assert all(len(set(cols["target"][groups == g])) == 1 for g in range(3)) and len(set(cols["target"])) == 3
    assert ((cols["confidence"] > 1 / 3) & (cols["confidence"] <= 1)).all()
