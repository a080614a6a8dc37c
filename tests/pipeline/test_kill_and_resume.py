"""SIGKILL the whole pipeline at exact points, re-run it each time, and end where an uninterrupted
run with the same seed ends: byte for byte.

Each point is a ``halt_point`` (``SEMIPRUNE_HALT_AT``): the process announces it has reached the
point and waits there, and the test kills the `semiprune run` process tree. So the kill lands
mid-epoch or mid-write every time, not wherever a timer happened to fall.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from .conftest import copy_project, run_cli

TINY = ["--profile", "synthetic", "--set", "data.synthetic.n_train=600", "--set", "data.synthetic.n_test=200",
        "--set", "data.labeled.per_class=5", "--set", "ssl.epochs=3", "--set", "ssl.batch_size=8",
        "--set", "proxy.epochs=3", "--set", "evaluate.epochs=3", "--name", "tiny"]
# the artifacts an uninterrupted run must match exactly
ARTIFACTS = ["artifacts/prepare/manifest.parquet", "artifacts/ssl/model.pt", "artifacts/pseudo/pseudo_labels.parquet",
             "artifacts/dynamics/fold_0.parquet", "artifacts/dynamics/fold_1.parquet", "artifacts/scores/scores.parquet",
             "artifacts/select/selection.parquet", "artifacts/select/kept.txt", "artifacts/audit/audit.parquet"]


def digest(ws: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((ws / rel).read_bytes()).hexdigest() for rel in ARTIFACTS}


def kill_at(project: Path, point: str) -> str:
    """Run the pipeline until it reaches ``point``, SIGKILL the whole process tree, return its output."""
    marker = project.parent / "halted"
    marker.unlink(missing_ok=True)
    env = dict(os.environ, DVC_NO_ANALYTICS="1", SEMIPRUNE_LOG_LEVEL="WARNING",
               SEMIPRUNE_HALT_AT=point, SEMIPRUNE_HALT_FILE=str(marker))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log = project.parent / f"kill-{point.replace(':', '-').replace('@', '')}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *TINY], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before {point}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{point} never reached"
            time.sleep(0.2)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            p.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def outcomes(output: str) -> dict[str, str]:
    """Stage -> outcome from the summary `semiprune run` prints."""
    out = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] == "s" and parts[1] in ("ran", "restored", "unchanged", "failed", "not"):
            out[parts[0]] = parts[1]
    return out


def metrics(ws: Path, name: str) -> dict:
    return json.loads((ws / "metrics" / f"{name}.json").read_text())


def test_killed_at_four_points_each_rerun_resumes_and_the_end_is_byte_identical(project, tmp_path):
    ws = project / "runs" / "tiny"
    kill_at(project, "ssl_train[fixmatch]:epoch1")
    assert (ws / ".semiprune/scratch/ssl_train/checkpoint.pt").exists() and not (ws / "artifacts/ssl/model.pt").exists()

    kill_at(project, "score@0:epoch1")
    assert metrics(ws, "ssl")["resumed_from_epoch"] == 1  # the re-run went on from its checkpoint

    kill_at(project, "write:scores.parquet")
    assert metrics(ws, "score_fold_0")["resumed_from_epoch"] == 1
    assert list((ws / "artifacts/scores").glob(".scores.parquet.*.tmp")), "killed mid-write"
    assert not (ws / "artifacts/scores/scores.parquet").exists(), "no partial table under the real name"

    kill_at(project, "evaluate:epoch1")
    assert not list((ws / "artifacts/scores").glob("*.tmp")), "the next write clears what a killed writer left"

    final = run_cli(project, "run", *TINY, check=True)
    done = outcomes(final.stderr)
    assert done["evaluate"] == "ran" and metrics(ws, "evaluate")["resumed_from_epoch"] == 1
    assert {done[s] for s in ("prepare", "ssl_train", "pseudo_label", "score@0", "score@1", "scores", "select")} == {"unchanged"}

    clean = copy_project(tmp_path / "clean")
    run_cli(clean, "run", *TINY, check=True)
    assert digest(ws) == digest(clean / "runs" / "tiny")
    assert metrics(ws, "evaluate")["test_accuracy"] == metrics(clean / "runs" / "tiny", "evaluate")["test_accuracy"]
