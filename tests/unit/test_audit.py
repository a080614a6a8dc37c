"""The audit table's pure parts: percentiles, the join, near matches, and one sample's explanation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from semiprune_core.audit import audit_table, explain, near_matches, percentile
from semiprune_core.errors import DataError


@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(float("nan"))), min_size=1, max_size=60))
def test_percentiles_follow_the_values_and_leave_nan_alone(values):
    values = np.array(values)
    pct = percentile(values)
    finite = np.isfinite(values)
    assert np.array_equal(np.isnan(pct), ~finite)
    v, p = values[finite], pct[finite]
    assert ((p >= 0) & (p <= 100)).all()
    for i in range(len(v)):
        assert (p[v == v[i]] == p[i]).all()  # ties share a percentile
        assert (p[v > v[i]] > p[i]).all()


def test_percentile_ends():
    assert percentile(np.array([3.0, 1.0, 2.0])).tolist() == [100.0, 0.0, 50.0]


def tables(n=4):
    ids = [f"train/{i:06d}" for i in range(n)]
    manifest = pa.table({"sample_id": ["test/000000", *ids], "split": ["test", *["train"] * n],
                         "label": pa.array([1, 0, None, 2, None], pa.int16()),
                         "is_labeled": [False, True, False, True, False], "path": pa.array([None] * (n + 1), pa.string()),
                         "is_corrupted": [False] * (n + 1)})
    pseudo = pa.table({"sample_id": ids, "target": pa.array([0, 1, 2, 1], pa.int16()),
                       "label_source": ["human", "pseudo", "human", "pseudo"], "pseudo_label": pa.array([0, 1, 2, 0], pa.int16()),
                       "confidence": pa.array([0.9, 0.6, 0.8, 0.3], pa.float32())})
    scores = pa.table({"sample_id": ids, "fold": pa.array([0, 1, 0, 1], pa.int8()),
                       "oos_aum": [2.0, -1.0, 0.5, -3.0], "ins_aum": [3.0, 1.0, 2.0, -0.5]})
    selection = pa.table({"sample_id": ids, "is_kept": [True, True, True, False], "rank": pa.array([0, 2, 1, 3], pa.int64()),
                          "stratum": pa.array([None] * n, pa.int32()),
                          "reason": pa.array(["kept: human-labeled seed", "kept: inside the cutoff window",
                                              "kept: human-labeled seed",
                                              "pruned: beyond the hard cutoff (likely wrong label)"]).dictionary_encode()})
    hidden = pa.table({"sample_id": ["test/000000", *ids], "true_label": [1, 0, 1, 2, 2]})
    return manifest, pseudo, scores, selection, hidden


def test_the_join_keeps_the_pool_only_with_seed_labels_and_percentiles():
    manifest, pseudo, scores, selection, hidden = tables()
    table = audit_table(manifest, pseudo, scores, selection, strategy="aum_cutoff", score_used="oos_aum", hidden=hidden)
    rows = table.to_pylist()
    assert [r["sample_id"] for r in rows] == [f"train/{i:06d}" for i in range(4)]
    assert [r["label"] for r in rows] == [0, None, 2, None]  # the human label, only for the seed
    assert [r["oos_aum_pct"] for r in rows] == pytest.approx([100.0, 100 / 3, 200 / 3, 0.0])
    assert [r["hidden_true_label"] for r in rows] == [0, 1, 2, 2]
    assert rows[3]["reason"].startswith("pruned") and rows[3]["strategy"] == "aum_cutoff"


def test_tables_out_of_order_are_refused():
    manifest, pseudo, scores, selection, _ = tables()
    shuffled = scores.take([1, 0, 2, 3])
    with pytest.raises(DataError, match="scores table does not list the pool's samples"):
        audit_table(manifest, pseudo, shuffled, selection, strategy="random", score_used="oos_aum")


def test_near_matches_put_the_same_number_first():
    ids = [f"train/{i:06d}" for i in range(0, 3000, 7)]
    assert near_matches("train/14", ids)[0] == "train/000014"
    assert near_matches("trian/000021", ids)[0] == "train/000021"
    assert near_matches("nothing-like-it", ids) == []


def test_explain_names_the_label_the_judges_and_the_rule():
    manifest, pseudo, scores, selection, hidden = tables()
    row = audit_table(manifest, pseudo, scores, selection, strategy="aum_cutoff", score_used="oos_aum",
                      hidden=hidden).to_pylist()[3]
    facts = explain(row, n_pool=4, class_names=["a", "b", "c"], params={"select": {"ratio": 0.25, "cutoff": 0.25}})
    text = "\n".join(facts["lines"])
    assert text.startswith("train/000003: PRUNED - pruned: beyond the hard cutoff")
    assert "label 'b': a pseudo-label from the SSL model (confidence 0.30)" in text
    assert "benchmark truth: 'c' (the target is WRONG)" in text
    assert "the unseen model (fold 1, never trained on it): oos_aum = -3.000, at percentile 0 of the pool (lower = harder)" in text
    assert "rule: strategy aum_cutoff by oos_aum at pruning ratio 0.25, cutoff 0.25; rank 4 of 4" in text
    assert facts["rule"] == "cutoff_pruned" and facts["file"] is None


def test_explain_gives_the_file_of_a_folder_dataset_sample():
    manifest, pseudo, scores, selection, _ = tables()
    manifest = manifest.set_column(manifest.schema.get_field_index("path"), "path",
                                   pa.array([None, "dog/0.png", "cat/1.png", "dog/2.png", "cat/3.png"]))
    row = audit_table(manifest, pseudo, scores, selection, strategy="random", score_used="oos_aum").to_pylist()[1]
    facts = explain(row, n_pool=4, class_names=["a", "b", "c"], params={}, root="/data/pets")
    assert facts["file"] == "/data/pets/cat/1.png" and facts["lines"][-1] == "  file: /data/pets/cat/1.png"
    assert facts["hidden_true_label"] is None and not any("benchmark truth" in line for line in facts["lines"])
