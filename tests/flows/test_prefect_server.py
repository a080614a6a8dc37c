"""`semiprune server`: one background Prefect server that later commands find and report to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from flows import prefect_server

from .conftest import dvc_env, dvc_repo

REPO = Path(__file__).resolve().parents[2]
PIPELINE = """
stages:
  a:
    cmd: python -c "open('a.txt', 'w').write('a')"
    outs:
      - a.txt
"""
# what `semiprune run` does before its flow: find the server, then run the flow (in another process)
FLOW = ("import sys; from pathlib import Path; from flows import prefect_server; "
        "print(prefect_server.use_running_server(), flush=True); "
        "from flows.curation import run_curation; run_curation(Path(sys.argv[1]), workers=1)")


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)


def flow_names(url: str) -> set[str]:
    request = urllib.request.Request(f"{url}/flows/filter", data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return {f["name"] for f in json.load(response)}


def test_a_background_server_serves_later_runs_until_it_is_stopped(tmp_path):
    env = {k: v for k, v in dvc_env().items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    assert cli("server", "status", env=env).returncode == 1  # none yet: each run would start a temporary one

    started = cli("server", "start", env=env)
    assert started.returncode == 0, started.stderr[-2000:]
    url = started.stdout.strip()
    state_file = tmp_path / "prefect-home" / prefect_server.STATE_NAME
    try:
        assert url.startswith("http://127.0.0.1:") and prefect_server.healthy(url)
        again = cli("server", "start", env=env)
        assert again.stdout.strip() == url and "already running" in again.stderr
        status = cli("server", "status", env=env)
        assert status.returncode == 0 and status.stdout.startswith(url)

        repo = dvc_repo(tmp_path / "p", PIPELINE)
        run = subprocess.run([sys.executable, "-c", FLOW, str(repo)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=240)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.splitlines()[0] == url  # found through the state file, no temporary server
        assert "semiprune-curation" in flow_names(url)  # the run's history lives on in the server
        assert (repo / "a.txt").read_text() == "a"
    finally:
        stopped = cli("server", "stop", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
    assert not prefect_server.healthy(url) and not state_file.exists()
    assert cli("server", "status", env=env).returncode == 1


def test_a_dead_servers_state_file_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / prefect_server.STATE_NAME).write_text(json.dumps({"url": "http://127.0.0.1:9/api", "pid": dead.pid}))
    assert prefect_server.running() is None
    assert prefect_server.use_running_server() is None and "PREFECT_API_URL" not in os.environ
    assert prefect_server.stop() is None and not (tmp_path / prefect_server.STATE_NAME).exists()


def test_the_server_starts_where_prefect_is_importable_without_its_command(tmp_path):
    # dependencies on PYTHONPATH (a `pip install --target`, a carried site-packages): no `prefect`
    # console script beside the interpreter or on PATH, as on a bare GPU machine
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.symlink_to(os.path.realpath(sys.executable))  # outside the venv: no pyvenv.cfg beside it
    site_packages = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    env = {k: v for k, v in dvc_env().items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", PYTHONPATH=f"{REPO}{os.pathsep}{site_packages}")
    run = lambda *args: subprocess.run([str(python), "-m", "flows.cli", "server", *args], cwd=REPO, env=env,
                                       capture_output=True, text=True, timeout=240)
    assert subprocess.run([str(python), "-c", "import prefect, sys; assert sys.prefix == sys.base_prefix"],
                          env=env).returncode == 0  # prefect importable, yet not from a venv with its script
    started = run("start")
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        assert prefect_server.healthy(started.stdout.strip())
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
