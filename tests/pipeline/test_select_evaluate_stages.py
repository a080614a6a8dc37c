"""select and evaluate under real DVC on the smoke profile: outputs, the caching promise, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semiprune_core.selection import REASONS

from .conftest import copy_project, needs_fmnist, run_cli

pytestmark = needs_fmnist
SMOKE = ["--profile", "smoke", "--name", "smoke"]
UPSTREAM = ("ssl_train", "pseudo_label", "score@0", "score@1", "scores")


def ran(proc: subprocess.CompletedProcess) -> set[str]:
    """The stages whose command DVC actually executed in this run."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """One full smoke-profile run of the whole pipeline; returns its workspace."""
    project = copy_project(tmp_path_factory.mktemp("select") / "project")
    proc = run_cli(project, "run", *SMOKE, check=True)
    assert ran(proc) == {"source", "prepare", *UPSTREAM, "select", "evaluate"}
    return project


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


def test_changing_only_the_ratio_reruns_only_select_and_evaluate(smoke):
    ws = smoke / "runs" / "smoke"
    upstream = {p: digest(p) for p in sorted((ws / "artifacts").rglob("*")) if p.is_file() and "select" not in p.parts}
    before = digest(ws / "artifacts/select/selection.parquet"), (ws / "metrics/evaluate.json").read_text()

    changed = run_cli(smoke, "run", *SMOKE, "--set", "select.ratio=0.7", check=True)
    # `source` is the always-run stat of the raw files; nothing else upstream executes
    assert ran(changed) == {"source", "select", "evaluate"}
    assert json.loads((ws / "metrics/evaluate.json").read_text())["coreset_size"] == 600
    assert {p: digest(p) for p in upstream} == upstream  # no upstream artifact was rewritten

    back = run_cli(smoke, "run", *SMOKE, check=True)  # the ratio set back: restored, not retrained
    assert ran(back) == {"source"}, back.stdout
    out = back.stdout + back.stderr
    for stage in ("select", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out
    assert (digest(ws / "artifacts/select/selection.parquet"), (ws / "metrics/evaluate.json").read_text()) == before

    retrain = run_cli(smoke, "run", *SMOKE, "--set", "evaluate.epochs=2", check=True)
    assert ran(retrain) == {"source", "evaluate"}
    run_cli(smoke, "run", *SMOKE, check=True)  # leave the workspace as the fixture made it


@pytest.mark.parametrize(("override", "message"), [
    ("select.ratio=1.5", "select.ratio"),
    ("select.strategy=greedy", "'random', 'easy', 'hard', 'ccs', 'aum_cutoff', 'dual_beta' or 'prototypicality'"),
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
