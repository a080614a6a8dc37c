"""Warm stage starts (tasks/_warm_start.py): a stage forked from the stage server behaves as the
process DVC started, and falls back to a cold start whenever the server cannot take it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.stages import stage_server
from flows.workspace import pid_alive

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm starts are Linux-only")

REPO = Path(__file__).resolve().parents[2]
# tasks.probe CODE [SECONDS]: report how it ran, sleep, exit with CODE
PROBE = """
import json, os, sys, time
import tasks
print(json.dumps({"warm": "torch" in sys.modules, "pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv,
                  "probe": os.environ.get("PROBE"), "server": os.environ.get("SEMIPRUNE_STAGE_SERVER"),
                  "tasks": tasks.__file__}), flush=True)
open("probe.pid", "w").write(str(os.getpid()))
print("a line on stderr", file=sys.stderr)
if sys.argv[1] == "raise":
    raise RuntimeError("the stage broke")
if len(sys.argv) > 2:  # a long stage, with a process of its own
    import subprocess
    sub = subprocess.Popen(["sleep", sys.argv[2]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    open("probe.sub", "w").write(str(sub.pid))
    time.sleep(float(sys.argv[2]))
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A stage folder with the project's tasks package and a probe stage, and a ready server for it."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "tasks").mkdir()
    for name in ("__init__.py", "_warm_start.py"):
        shutil.copy(REPO / "tasks" / name, ws / "tasks" / name)
    (ws / "tasks" / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with stage_server(ws, env) as path:
        deadline = time.monotonic() + 120
        while not os.path.exists(path):  # the socket appears once torch is imported
            assert time.monotonic() < deadline, "the stage server never listened"
            time.sleep(0.1)
        yield ws, path, env


def stage(ws: Path, env: dict, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tasks.probe", *args], cwd=ws, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def sleeping_stage(ws: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """A probe stage sleeping for a minute, and the pid of the process that runs it."""
    (ws / "probe.pid").unlink(missing_ok=True)
    (ws / "probe.sub").unlink(missing_ok=True)
    proc = stage(ws, env, "0", "60")
    deadline = time.monotonic() + 60
    while not (ws / "probe.sub").exists() or not (ws / "probe.sub").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc, int((ws / "probe.pid").read_text())


def report(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, json.loads(out.splitlines()[0]), err


def test_a_forked_stage_runs_where_with_what_and_as_python_m_would_with_torch_imported(server):
    ws, path, env = server
    proc = stage(ws, {**env, "SEMIPRUNE_STAGE_SERVER": path, "PROBE": "x"}, "7", "0")
    code, seen, err = report(proc)
    assert code == 7 and seen["warm"] and seen["pid"] != proc.pid
    assert seen["cwd"] == str(ws) and seen["argv"] == [str(ws / "tasks" / "probe.py"), "7", "0"]
    assert seen["probe"] == "x" and seen["server"] is None  # its environment, less the server's address
    assert seen["tasks"] == str(ws / "tasks" / "__init__.py")  # the stage folder's code, not the server's
    assert "a line on stderr" in err


@pytest.mark.parametrize("how", ["no server", "other thread count"])
def test_a_stage_the_server_cannot_take_starts_cold_with_the_same_result(server, how):
    ws, path, env = server
    env = {**env, "SEMIPRUNE_STAGE_SERVER": path, "PROBE": "x"}
    if how == "no server":
        env["SEMIPRUNE_STAGE_SERVER"] = str(ws / "missing.sock")
    else:  # read when torch loads: a process forked from the server would not have it (any value but
        # the server's, which a Dask cluster made earlier in this process may have set)
        env["OMP_NUM_THREADS"] = str(int(env.get("OMP_NUM_THREADS") or 0) + 1)
    proc = stage(ws, env, "3")
    code, seen, err = report(proc)
    assert code == 3 and not seen["warm"] and seen["pid"] == proc.pid and seen["probe"] == "x"
    assert "a line on stderr" in err


def test_a_stage_that_raises_exits_1_with_its_traceback(server):
    ws, path, env = server
    code, seen, err = report(stage(ws, {**env, "SEMIPRUNE_STAGE_SERVER": path}, "raise"))
    assert code == 1 and seen["warm"] and "RuntimeError: the stage broke" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_stage_process_ends_the_forked_stage(server, sig):
    ws, path, env = server
    proc, child = sleeping_stage(ws, {**env, "SEMIPRUNE_STAGE_SERVER": path})
    assert child != proc.pid
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    # Ctrl-C ends it as the stage's KeyboardInterrupt (exit 130); TERM and KILL as the signal itself
    assert proc.returncode == (130 if sig == signal.SIGINT else -sig)
    # killed outright, as a timeout kills a stage's process tree: what the stage started goes too
    gone = [child, int((ws / "probe.sub").read_text())] if sig == signal.SIGKILL else [child]
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in gone):
        assert time.monotonic() < deadline, f"the forked stage or its process outlived the stage ({sig.name})"
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):  # a stage ended by a signal leaves its own to itself
        os.kill(int((ws / "probe.sub").read_text()), signal.SIGKILL)


def test_the_server_ends_with_its_run_and_can_be_turned_off(tmp_path):
    with stage_server(tmp_path, {**os.environ, "SEMIPRUNE_WARM_STAGES": "0"}) as path:
        assert path is None
    with stage_server(tmp_path, {**os.environ, "PYTHONPATH": str(REPO)}) as path:
        folder = Path(path).parent
        assert folder.is_dir() and oct(folder.stat().st_mode & 0o777) == "0o700"  # only this user connects
        servers = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and path in p.info["cmdline"]]
        assert len(servers) == 1
    assert not folder.exists() and not pid_alive(servers[0])


def test_a_forked_stage_killed_on_its_own_fails_its_stage_with_a_clear_error(server):
    ws, path, env = server
    proc, child = sleeping_stage(ws, {**env, "SEMIPRUNE_STAGE_SERVER": path})
    os.kill(child, signal.SIGKILL)  # as the kernel's OOM killer would
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.splitlines()[-1] == ("error: tasks.probe ended without an exit status: its process (forked from "
                                    "the stage server) was killed")
