"""A team's shared cache (two clones, one directory remote), concurrent runs, and scheduled runs."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .conftest import copy_project, needs_fmnist, run_cli

SMOKE = ["--profile", "smoke"]


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_cli(project: Path, log: Path, *args: str) -> subprocess.Popen:
    """``semiprune ARGS`` in the background, its output going to ``log`` (a pipe could fill and stall it)."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", SEMIPRUNE_LOG_LEVEL="WARNING")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


@needs_fmnist
def test_a_second_clone_gets_every_result_from_the_team_remote_without_training(tmp_path):
    remote = tmp_path / "team-cache"
    remote.mkdir()
    first = copy_project(tmp_path / "first")
    run_cli(first, "remote", "add", str(remote), check=True)
    # two flow runs at once, in two workspaces on the same cache, both pushing to the remote
    runs = {ratio: start_cli(first, tmp_path / f"{ratio}.log", "run", *SMOKE, "--set", f"select.ratio={ratio}",
                             "--name", f"r{ratio}", "--push") for ratio in ("0.5", "0.7")}
    for ratio, proc in runs.items():
        proc.wait(timeout=900)
        log = (tmp_path / f"{ratio}.log").read_text()
        assert proc.returncode == 0, f"run at ratio {ratio} failed:\n{log[-3000:]}"
        assert "push 'team'" in log
    done = first / "runs" / "r0.7"

    second = copy_project(tmp_path / "second")
    run_cli(second, "remote", "add", str(remote), check=True)
    proc = run_cli(second, "run", *SMOKE, "--set", "select.ratio=0.7", "--name", "r0.7", "--pull", check=True)
    assert ran(proc.stderr) == {"source"}, proc.stderr[-3000:]  # the stat of the raw files; nothing trained
    got = second / "runs" / "r0.7"
    for rel in ("artifacts/ssl/model.pt", "artifacts/dynamics/fold_0.parquet", "artifacts/select/selection.parquet"):
        assert digest(got / rel) == digest(done / rel), rel
    assert (got / "metrics/evaluate.json").read_text() == (done / "metrics/evaluate.json").read_text()

    # someone with write access to the share replaces the selection's object with other bytes
    outs = yaml.safe_load((done / "dvc.lock").read_text())["stages"]["select"]["outs"]
    md5 = next(o["md5"] for o in outs if o["path"].endswith("selection.parquet"))
    obj = remote / "files" / "md5" / md5[:2] / md5[2:]
    obj.chmod(0o644)
    obj.write_bytes(b"PAR1 not the selection")
    third = copy_project(tmp_path / "third")
    run_cli(third, "remote", "add", str(remote), check=True)
    assert "verify = true" in (third / ".dvc/config").read_text()
    proc = run_cli(third, "run", *SMOKE, "--set", "select.ratio=0.7", "--name", "r0.7", "--pull", check=True)
    assert "select" in ran(proc.stderr) and "ssl_train" not in ran(proc.stderr)  # recomputed, not taken
    assert digest(third / "runs/r0.7/artifacts/select/selection.parquet") == digest(done / "artifacts/select/selection.parquet")


def test_remote_problems_are_clear_errors(project, tmp_path):
    proc = run_cli(project, "run", *SMOKE, "--pull")
    assert proc.returncode == 2 and "no team remote is configured" in proc.stderr.splitlines()[-1]
    proc = run_cli(project, "remote", "add", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    shared = tmp_path / "shared"
    shared.mkdir()
    run_cli(project, "remote", "add", str(shared), check=True)
    assert run_cli(project, "remote", "show", check=True).stdout == f"team\t{shared}\n"
    shutil.rmtree(shared)  # the share is gone (unmounted)
    proc = run_cli(project, "push", *SMOKE)
    assert proc.returncode == 2 and "is unreachable: no such directory" in proc.stderr.splitlines()[-1]
    shared.mkdir()
    proc = run_cli(project, "pull", *SMOKE)
    assert proc.returncode == 2 and "has no dvc.lock" in proc.stderr.splitlines()[-1]


def test_a_folder_that_is_not_a_dvc_repository_is_refused(project):
    shutil.rmtree(project / ".dvc")
    proc = run_cli(project, "run")
    assert proc.returncode == 2 and "is not a DVC repository" in proc.stderr.splitlines()[-1]


def test_a_cron_expression_that_does_not_parse_is_refused(project):
    proc = run_cli(project, "serve", *SMOKE, "--cron", "every night")
    assert proc.returncode == 2 and "cron expression 'every night' does not parse" in proc.stderr.splitlines()[-1]


def test_serve_registers_a_deployment_on_the_schedule(project, tmp_path):
    from prefect.client.orchestration import get_client

    log = tmp_path / "serve.log"
    proc = start_cli(project, log, "serve", *SMOKE, "--cron", "0 3 * * *")
    try:
        deadline, deployment = time.monotonic() + 120, None
        while deployment is None and proc.poll() is None and time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                found = client.read_deployments()
            deployment = next((d for d in found if d.name == "semiprune-smoke"), None)
            time.sleep(0.5)
        assert deployment is not None, log.read_text()[-3000:]
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.parameters["workspace"] == str(project / "runs" / "smoke")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
