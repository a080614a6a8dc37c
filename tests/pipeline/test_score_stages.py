"""score@fold and scores as DVC runs them, on the seeded synthetic source."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from semiprune_core.scoring import SCORES

from .conftest import run_cli

TINY = ["--profile", "synthetic", "--set", "data.synthetic.n_train=600", "--set", "data.synthetic.n_test=200",
        "--set", "data.labeled.per_class=5", "--set", "ssl.epochs=2", "--set", "ssl.batch_size=8",
        "--set", "proxy.epochs=4"]


def test_every_sample_gets_out_of_sample_and_in_sample_scores(project):
    run_cli(project, "run", *TINY, "--name", "tiny", check=True)
    ws = project / "runs" / "tiny"
    table = pq.read_table(ws / "artifacts/scores/scores.parquet").to_pandas()
    assert len(table) == 600 and table["sample_id"].is_unique
    assert sorted(table["fold"].unique()) == [0, 1]
    for score in SCORES:
        assert f"oos_{score}" in table and f"ins_{score}" in table, score
    assert np.isfinite(table["oos_aum"]).all() and np.isfinite(table["ins_aum"]).all()
    for k in (0, 1):
        dyn = pq.read_table(ws / f"artifacts/dynamics/fold_{k}.parquet")
        held = dyn["is_oos"].to_numpy(zero_copy_only=False)
        assert (dyn["fold"].to_numpy()[held] == k).all() and (dyn["fold"].to_numpy()[~held] != k).all()
        cost = json.loads((ws / f"metrics/score_fold_{k}.json").read_text())
        assert cost["epochs"] == 4 and cost["sample_passes"] == 4 * 600
    metrics = json.loads((ws / "metrics/scores.json").read_text())
    assert set(metrics["spread"]) >= {"oos_aum", "ins_aum"}
    assert 0 <= metrics["wrong_target_auroc"]["oos_aum"] <= 1


def test_changing_a_scores_param_reuses_the_fold_dynamics(project):
    run_cli(project, "run", *TINY, check=True)
    proc = run_cli(project, "run", *TINY, "--set", "scores.window=2", check=True)
    out = proc.stdout + proc.stderr
    for stage in ("ssl_train", "pseudo_label", "score@0", "score@1"):
        assert f"Stage '{stage}' is cached - skipping run" in out, stage
    assert "Running stage 'scores'" in out


def test_folds_stopped_early_record_only_the_epochs_the_early_scores_need(project):
    args = [a if a != "proxy.epochs=4" else "proxy.epochs=6" for a in TINY]
    run_cli(project, "run", *args, "--set", "proxy.stop_after=3", "--set", "scores.first_dual=3",
            "--set", "scores.first_el2n=2", "--name", "early", check=True)
    ws = project / "runs" / "early"
    for k in (0, 1):
        cost = json.loads((ws / f"metrics/score_fold_{k}.json").read_text())
        assert (cost["epochs"], cost["schedule_epochs"], cost["sample_passes"]) == (3, 6, 3 * 600)
        assert pq.read_schema(ws / f"artifacts/dynamics/fold_{k}.parquet").field("margin").type.list_size == 3
    metrics = json.loads((ws / "metrics/scores.json").read_text())
    assert (metrics["epochs"], metrics["schedule_epochs"]) == (3, 6)
    # DUAL over the first 5 epochs cannot come from folds that stopped after 3: refused, not silently shortened
    proc = run_cli(project, "run", *args, "--set", "proxy.stop_after=3", "--set", "scores.first_dual=5",
                   "--set", "scores.first_el2n=2")
    assert proc.returncode == 2
    assert "scores.first_dual is 5 epochs, but the folds stopped after 3 of 6" in proc.stderr, proc.stderr[-500:]


def test_bad_fold_params_are_refused(project):
    proc = run_cli(project, "run", *TINY, "--set", "cv.k=1")
    assert proc.returncode == 2 and "cv.k" in proc.stderr
    proc = run_cli(project, "run", *TINY, "--set", "cv.k=3")
    assert proc.returncode == 2 and "folds must list 0..k-1" in proc.stderr


def test_a_killed_fold_resumes_and_the_other_fold_is_not_rerun(project):
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [a if a != "proxy.epochs=4" else "proxy.epochs=12" for a in TINY] + ["--name", "tiny"]
    run_cli(project, "run", *args, "score@1", check=True)  # fold 1 done before fold 0 starts
    ws = project / "runs" / "tiny"
    checkpoint = ws / ".semiprune/scratch/score_0/checkpoint.pt"
    env = dict(os.environ, SEMIPRUNE_LOG_LEVEL="WARNING", DVC_NO_ANALYTICS="1")
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *args], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "fold 0 finished before it could be killed; give it more epochs"
    os.killpg(proc.pid, signal.SIGKILL)  # DVC and the stage it runs
    proc.wait()
    out = ws / "artifacts/dynamics/fold_0.parquet"
    assert not out.exists(), "a killed fold must not leave a dynamics file behind"

    rerun = run_cli(project, "run", *args, check=True)
    log = rerun.stdout + rerun.stderr
    assert "Running stage 'score@0'" in log and "Running stage 'score@1'" not in log, log
    cost = json.loads((ws / "metrics/score_fold_0.json").read_text())
    assert cost["resumed_from_epoch"] is not None and cost["resumed_from_epoch"] >= 1
    resumed = hashlib.sha256(out.read_bytes()).hexdigest()

    fresh = subprocess.run([sys.executable, "-m", "tasks.score_fold", "0"], cwd=ws, env=env, capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert json.loads((ws / "metrics/score_fold_0.json").read_text())["resumed_from_epoch"] is None
    assert hashlib.sha256(out.read_bytes()).hexdigest() == resumed, "resumed dynamics differ from an uninterrupted run"
