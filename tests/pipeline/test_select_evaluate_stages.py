"""select and evaluate under real DVC on the smoke profile: outputs, the caching promise, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semiprune_core.selection import REASONS

from .conftest import SMOKE, needs_fmnist, ran, run_cli

pytestmark = needs_fmnist


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_whole_pipeline_writes_a_selection_and_an_evaluation(smoke):
    ws = smoke / "runs" / "smoke"
    table = pq.read_table(ws / "artifacts/select/selection.parquet").to_pandas()
    assert len(table) == 2000 and table["sample_id"].is_unique
    assert {"sample_id", "is_kept", "rank", "stratum", "oos_aum", "target", "label_source", "reason"} <= set(table)
    assert table["is_kept"].sum() == 1000  # smoke: ratio 0.5 of 2,000
    assert table.loc[table["label_source"] == "human", "is_kept"].all()
    assert set(table["reason"]) <= set(REASONS.values())
    kept = (ws / "artifacts/select/kept.txt").read_text().split()
    assert kept == sorted(table.loc[table["is_kept"], "sample_id"])
    metrics = json.loads((ws / "metrics/evaluate.json").read_text())
    assert metrics["coreset_size"] == 1000 and metrics["labels_used"] == 1000
    assert metrics["labels"] == "true_label"  # Fashion-MNIST: the coreset is trained on its real labels
    assert 0.1 < metrics["test_accuracy"] <= 1 and len(metrics["per_class_accuracy"]) == 10
    assert metrics["epochs"] == 15 and metrics["sample_passes"] == 15 * 1000 + 500
    history = (ws / "plots/evaluate_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss,acc") and len(history) == 16


def test_the_run_publishes_its_summary_and_the_pruned_samples_to_prefect(smoke):
    from prefect.artifacts import Artifact

    run_cli(smoke, "run", *SMOKE, check=True)  # nothing to do, but a run that publishes: the latest
    summary = Artifact.get("semiprune-run").data
    assert "| evaluate | unchanged |" in summary and "Test accuracy" in summary and "ratio: 0.5" in summary
    assert "kept 1000 of 2000, pruned 1000" in summary
    pruned = Artifact.get("semiprune-pruned")
    rows = json.loads(pruned.data)
    assert pruned.description.startswith("1000 pruned samples (all shown)") and len(rows) == 1000
    table = pq.read_table(smoke / "runs/smoke/artifacts/select/selection.parquet").to_pandas()
    assert {r["sample_id"] for r in rows} == set(table.loc[~table["is_kept"], "sample_id"])
    assert {r["reason"] for r in rows} <= set(REASONS.values())


def test_status_says_which_stages_are_stale_and_why(smoke):
    run_cli(smoke, "run", *SMOKE, check=True)
    clean = run_cli(smoke, "status", *SMOKE, check=True).stdout
    assert all(line.split()[1] in ("checks", "up") for line in clean.splitlines()), clean
    edited = run_cli(smoke, "status", *SMOKE, "--set", "select.ratio=0.7", "--json", check=True).stdout
    rows = {r["stage"]: r for r in json.loads(edited)}
    assert rows["select"]["state"] == "stale" and rows["select"]["why"] == ["param select.ratio 0.5 -> 0.7"]
    assert rows["evaluate"]["state"] == "may re-run" and rows["ssl_train"]["state"] == "up to date"
    run_cli(smoke, "params", *SMOKE, "--materialize", check=True)  # the workspace's params as the fixture made them


def test_a_sweep_reuses_the_dynamics_and_writes_one_table(smoke):
    proc = run_cli(smoke, "sweep", "--profile", "smoke", "--ratios", "0.3", "0.6",
                   "--strategies", "random", "aum_cutoff", check=True)
    table = pq.read_table(smoke / "reports/sweep/sweep.parquet").to_pandas()
    assert sorted(zip(table["strategy"], table["ratio"])) == [("aum_cutoff", 0.3), ("aum_cutoff", 0.6),
                                                             ("random", 0.3), ("random", 0.6)]
    assert (table.loc[table["ratio"] == 0.3, "n_kept"] == 1400).all() and (table.loc[table["ratio"] == 0.6, "n_kept"] == 800).all()
    assert table["test_accuracy"].between(0.1, 1).all()
    # nothing upstream of select trained again: each run restored it from the shared run-cache
    assert set(",".join(table["ran"]).split(",")) == {"source", "select", "audit", "evaluate"}, table["ran"].tolist()
    assert "| random | " in proc.stdout and (smoke / "reports/sweep/sweep.md").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--ratios", "0.3", "0.3", "--strategies", "random"], "duplicate ratio in the sweep: 0.3"),
    (["--ratios", "0.3", "--strategies", "greedy"], "select.strategy"),
    (["--ratios", "1.3", "--strategies", "random"], "select.ratio"),
])
def test_a_bad_sweep_is_refused_before_anything_runs(smoke, args, message):
    proc = run_cli(smoke, "sweep", "--profile", "smoke", *args)
    assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], proc.stderr[-1500:]


def test_changing_only_the_ratio_reruns_only_select_and_evaluate(smoke):
    ws = smoke / "runs" / "smoke"
    upstream = {p: digest(p) for p in sorted((ws / "artifacts").rglob("*")) if p.is_file() and not {"select", "audit"} & set(p.parts)}
    before = digest(ws / "artifacts/select/selection.parquet"), (ws / "metrics/evaluate.json").read_text()

    changed = run_cli(smoke, "run", *SMOKE, "--set", "select.ratio=0.7", check=True)
    # `source` is the always-run stat of the raw files; nothing else upstream executes
    assert ran(changed) == {"source", "select", "audit", "evaluate"}
    assert json.loads((ws / "metrics/evaluate.json").read_text())["coreset_size"] == 600
    assert {p: digest(p) for p in upstream} == upstream  # no upstream artifact was rewritten

    back = run_cli(smoke, "run", *SMOKE, check=True)  # the ratio set back: restored, not retrained
    assert ran(back) == {"source"}, back.stdout
    out = back.stdout + back.stderr
    for stage in ("select", "audit", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out
    assert (digest(ws / "artifacts/select/selection.parquet"), (ws / "metrics/evaluate.json").read_text()) == before

    retrain = run_cli(smoke, "run", *SMOKE, "--set", "evaluate.epochs=2", check=True)
    assert ran(retrain) == {"source", "evaluate"}
    run_cli(smoke, "run", *SMOKE, check=True)  # leave the workspace as the fixture made it


@pytest.mark.parametrize(("override", "message"), [
    ("select.ratio=1.5", "select.ratio"),
    ("select.strategy=greedy", "'random', 'easy', 'hard', 'ccs', 'aum_cutoff', 'dual_beta', 'prototypicality' or 'unseen_multistep'"),
    ("select.score=oos_speed", "choose one of oos_aum"),
    ("select.min_per_class=500", "fewer than select.min_per_class=500"),
    ("select.cutoff=0.6", "cutoff 0.6 drops"),
])
def test_bad_select_params_fail_clearly_and_keep_the_previous_selection(smoke, override, message):
    ws = smoke / "runs" / "smoke"
    before = digest(ws / "artifacts/select/selection.parquet")
    proc = run_cli(smoke, "run", *SMOKE, "--set", override)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert digest(ws / "artifacts/select/selection.parquet") == before


def test_a_nan_score_is_refused_and_the_previous_selection_kept(smoke, tmp_path):
    ws = smoke / "runs" / "smoke"
    scores_path = ws / "artifacts/scores/scores.parquet"
    original = scores_path.read_bytes()
    selection = ws / "artifacts/select/selection.parquet"
    before = digest(selection)
    table = pq.read_table(scores_path)
    aum = table["oos_aum"].to_numpy().copy()
    aum[3] = np.nan
    try:
        scores_path.unlink()  # DVC may have linked it to its cache: never write through the link
        pq.write_table(table.set_column(table.column_names.index("oos_aum"), "oos_aum", pa.array(aum)), scores_path)
        env = dict(os.environ, SEMIPRUNE_LOG_LEVEL="WARNING")
        proc = subprocess.run([sys.executable, "-m", "tasks.select"], cwd=ws, env=env, capture_output=True, text=True)
    finally:
        scores_path.unlink()
        scores_path.write_bytes(original)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: score 'oos_aum' is NaN for 1 samples")
    assert digest(selection) == before


def test_multistep_unseen_selection_trains_a_scorer_per_step_and_records_its_cost(smoke):
    args = ["--profile", "smoke", "--set", "select.strategy=unseen_multistep", "--set", "select.step_epochs=2",
            "--set", "select.class_aware=true", "--name", "multistep"]
    proc = run_cli(smoke, "run", *args, check=True)
    assert ran(proc) == {"source", "select", "audit", "evaluate"}  # the dynamics come from the cache
    ws = smoke / "runs" / "multistep"
    table = pq.read_table(ws / "artifacts/select/selection.parquet").to_pandas()
    assert table["is_kept"].sum() == 1000 and table.loc[table["label_source"] == "human", "is_kept"].all()
    assert sorted(table.loc[table["is_kept"], "stratum"].unique()) == [1, 2, 3]
    cost = json.loads((ws / "metrics/select.json").read_text())["multistep"]
    assert [s["step"] for s in cost["steps"]] == [2, 3] and [s["coreset"] for s in cost["steps"]] == [333, 666]
    assert cost["sample_passes"] == sum(s["sample_passes"] for s in cost["steps"]) > 0
    assert json.loads((ws / "metrics/evaluate.json").read_text())["coreset_size"] == 1000


@pytest.mark.parametrize(("targets", "source"), [("oracle", "oracle"), ("clusters", "cluster")])
def test_the_oracle_and_label_free_baselines_run_the_same_pipeline(smoke, targets, source):
    proc = run_cli(smoke, "run", "--profile", "smoke", "--set", f"pseudo.targets={targets}", "--name", targets, check=True)
    assert "ssl_train" not in ran(proc) and {"pseudo_label", "score@0", "select", "evaluate"} <= ran(proc)
    ws = smoke / "runs" / targets
    labels = pq.read_table(ws / "artifacts/pseudo/pseudo_labels.parquet").to_pandas()
    assert (labels["label_source"] == source).all()
    hidden = pq.read_table(ws / "artifacts/prepare/hidden_labels.parquet").to_pandas().set_index("sample_id")
    truth = hidden.loc[labels["sample_id"], "true_label"].to_numpy()
    if targets == "oracle":
        assert (labels["target"].to_numpy() == truth).all()
    else:  # label-free: ten clusters, not classes (no label was read to make them)
        assert labels["target"].nunique() == 10
    assert json.loads((ws / "metrics/pseudo.json").read_text())["targets_from"] == targets
    assert json.loads((ws / "metrics/evaluate.json").read_text())["coreset_size"] == 1000
