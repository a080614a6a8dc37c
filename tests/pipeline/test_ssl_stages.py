"""ssl_train and pseudo_label as DVC runs them, on the seeded synthetic source."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semiprune_core.io import table_meta, write_table

from .conftest import run_cli

TINY = ["--profile", "synthetic", "--set", "data.synthetic.n_train=600", "--set", "data.synthetic.n_test=200",
        "--set", "data.labeled.per_class=5", "--set", "ssl.epochs=3", "--set", "ssl.batch_size=8",
        "--name", "tiny"]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_stage(ws, stage):
    env = dict(os.environ, SEMIPRUNE_LOG_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_pipeline_writes_model_pseudo_labels_and_metrics(project):
    run_cli(project, "run", *TINY, check=True)
    ws = project / "runs" / "tiny"
    table = pq.read_table(ws / "artifacts/pseudo/pseudo_labels.parquet").to_pandas()
    assert len(table) == 600 and table["sample_id"].is_unique
    human = table["label_source"] == "human"
    assert human.sum() == 50
    manifest = pq.read_table(ws / "artifacts/prepare/manifest.parquet").to_pandas().set_index("sample_id")
    labeled = manifest.loc[table.loc[human, "sample_id"]]
    assert (table.loc[human, "target"].to_numpy() == labeled["label"].to_numpy()).all(), "human labels win"
    assert (table.loc[~human, "target"] == table.loc[~human, "pseudo_label"]).all()
    ssl = json.loads((ws / "metrics/ssl.json").read_text())
    assert ssl["labeled"] == 50 and ssl["unlabeled"] == 550 and ssl["epochs"] == 3 and ssl["sample_passes"] > 0
    assert 0 <= ssl["test_accuracy"] <= 1
    pseudo = json.loads((ws / "metrics/pseudo.json").read_text())
    assert sum(pseudo["target_histogram"].values()) == 600
    assert pseudo["pseudo_label_accuracy"]["n"] == 550


def test_hidden_true_labels_never_reach_a_model_or_a_pseudo_label(project):
    run_cli(project, "run", *TINY, check=True)
    ws = project / "runs" / "tiny"
    model = ws / "artifacts/ssl/model.pt"
    labels = ws / "artifacts/pseudo/pseudo_labels.parquet"
    before = sha(model), sha(labels)
    acc_before = json.loads((ws / "metrics/pseudo.json").read_text())["pseudo_label_accuracy"]["accuracy"]

    hidden_path = ws / "artifacts/prepare/hidden_labels.parquet"
    hidden = pq.read_table(hidden_path)
    manifest = pq.read_table(ws / "artifacts/prepare/manifest.parquet", columns=["sample_id", "is_labeled", "split"])
    unlabeled = np.flatnonzero(~manifest["is_labeled"].to_numpy() & (manifest["split"].to_numpy(zero_copy_only=False) == "train"))
    # every unlabeled sample's "truth" becomes a class its pseudo-label is not: a report that reads
    # this truth must now find 0 % correct (a permutation could leave the accuracy unchanged)
    pseudo = pq.read_table(labels, columns=["sample_id", "pseudo_label"])
    guess = dict(zip(pseudo["sample_id"].to_pylist(), pseudo["pseudo_label"].to_pylist()))
    true = hidden["true_label"].to_numpy().copy()
    ids = hidden["sample_id"].to_pylist()
    for i in unlabeled:
        true[i] = (guess[ids[i]] + 1) % 10
    hidden_path.chmod(0o644)
    write_table(hidden_path, hidden.set_column(1, "true_label", pa.array(true, pa.int16())), meta=table_meta(hidden))

    run_stage(ws, "ssl_train")
    run_stage(ws, "pseudo_label")
    assert (sha(model), sha(labels)) == before
    acc_after = json.loads((ws / "metrics/pseudo.json").read_text())["pseudo_label_accuracy"]["accuracy"]
    assert acc_before > 0 and acc_after == 0, "the report must have read the edited truth"


def test_threshold_out_of_range_is_refused_before_anything_runs(project):
    proc = run_cli(project, "run", *TINY[:-2], "--set", "ssl.threshold=1.5")
    assert proc.returncode == 2 and "ssl.threshold" in proc.stderr
    proc = run_cli(project, "run", *TINY[:-2], "--set", "ssl.epochs=0")
    assert proc.returncode == 2 and "ssl.epochs" in proc.stderr


def test_killed_ssl_train_resumes_from_its_checkpoint_and_ends_identical(project):
    import signal
    import time

    args = [a if a != "ssl.epochs=3" else "ssl.epochs=6" for a in TINY]
    run_cli(project, "run", *args, check=True)
    ws = project / "runs" / "tiny"
    model = ws / "artifacts/ssl/model.pt"
    uninterrupted = sha(model)

    checkpoint = ws / ".semiprune/scratch/ssl_train/checkpoint.pt"
    env = dict(os.environ, SEMIPRUNE_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "tasks.ssl_train"], cwd=ws, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed; give it more epochs"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    run_stage(ws, "ssl_train")
    metrics = json.loads((ws / "metrics/ssl.json").read_text())
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 1
    assert sha(model) == uninterrupted
    assert not checkpoint.exists(), "a finished run cleans up its checkpoint"


def test_mu_must_be_positive(project):
    proc = run_cli(project, "run", *TINY[:-2], "--set", "ssl.mu=0")
    assert proc.returncode == 2 and "ssl.mu" in proc.stderr
