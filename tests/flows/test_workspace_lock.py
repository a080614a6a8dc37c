"""One run per workspace: a second run fails at once with exit 75 or, with --wait, queues."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.curation import run_curation
from flows.workspace import run_lock
from semiprune_core.errors import WorkspaceBusy

from .conftest import dvc_env, dvc_repo

ROOT = Path(__file__).resolve().parents[2]
# a stage that takes long enough to overlap with a second run, then writes its output
SLOW = """
stages:
  slow:
    cmd: python -c "import time; time.sleep(4); open('out.txt', 'w').write('done')"
    outs:
      - out.txt
"""
HOLD = "import sys, time; from pathlib import Path; from flows.workspace import run_lock\n" \
       "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n"


def holder(ws: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ws)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_in_a_busy_workspace_fails_naming_the_holder(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(WorkspaceBusy, match=rf"in use by another semiprune run \(pid {proc.pid}, started .*--wait") as err:
            with run_lock(tmp_path):
                pass
        assert err.value.exit_code == 75 and "\n" not in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_frees_the_workspace_and_a_waiting_run_starts_then(tmp_path):
    proc = holder(tmp_path)
    waited = []
    killer = subprocess.Popen([sys.executable, "-c", f"import os, signal, time; time.sleep(1.5); os.kill({proc.pid}, signal.SIGKILL)"])
    start = time.monotonic()
    with run_lock(tmp_path, wait=True):
        waited.append(time.monotonic() - start)
        with run_lock(tmp_path):  # re-entrant in the process that holds it
            pass
    killer.wait()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and waited[0] >= 1.0  # it did wait for the kill
    with run_lock(tmp_path):  # and released it afterwards
        pass


def test_two_runs_of_one_workspace_never_interleave(prefect_harness, tmp_path):
    repo = dvc_repo(tmp_path / "p", SLOW)
    env = dvc_env()
    code = "import sys; from pathlib import Path; from flows.curation import run_curation; run_curation(Path(sys.argv[1]), workers=1)"
    first = subprocess.Popen([sys.executable, "-c", code, str(repo)], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lock = repo / ".semiprune" / "run.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().startswith("pid")):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() is not None else "no lock"
        time.sleep(0.1)
    with pytest.raises(WorkspaceBusy, match=f"pid {first.pid}"):
        run_curation(repo, workers=1)
    assert not (repo / "out.txt").exists()  # the busy run touched nothing
    records = run_curation(repo, workers=1, wait=True)  # queues behind the first, then finds it done
    assert first.wait(timeout=120) == 0, first.stdout.read()
    assert {r["outcome"] for r in records} == {"unchanged"} and (repo / "out.txt").read_text() == "done"
