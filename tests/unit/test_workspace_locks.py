"""Stale DVC locks left by a killed run are cleared; a live run's locks stay."""

import json
import os
import subprocess
import sys

from flows.workspace import clear_stale_dvc_locks


def test_only_dead_processes_lose_their_locks(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = os.getpid()
    lock = {
        "read": {"a": [{"pid": dead.pid, "cmd": "dvc repro"}, {"pid": me, "cmd": "dvc repro"}],
                 "b": [{"pid": dead.pid, "cmd": "dvc repro"}]},
        "write": {"c": {"pid": dead.pid, "cmd": "dvc repro"}, "d": {"pid": me, "cmd": "dvc repro"}},
    }
    path = tmp_path / ".dvc" / "tmp" / "rwlock"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(lock))
    assert clear_stale_dvc_locks(tmp_path) == [dead.pid]
    assert json.loads(path.read_text()) == {
        "read": {"a": [{"pid": me, "cmd": "dvc repro"}]},
        "write": {"d": {"pid": me, "cmd": "dvc repro"}},
    }
    assert clear_stale_dvc_locks(tmp_path) == []


def test_no_lock_file_is_fine(tmp_path):
    assert clear_stale_dvc_locks(tmp_path) == []
