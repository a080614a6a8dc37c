"""The stage graph read from DVC, and single stages run through real DVC in a tiny repository."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.stages import outcome_of, reuse_cached, run_stage, stage_graph
from semiprune_core.errors import ConfigError

from .conftest import dvc_env, dvc_repo

DVC_YAML = """
stages:
  a:
    cmd: python -c "open('a.txt', 'w').write('a')"
    outs:
      - a.txt
  b:
    foreach: [0, 1]
    do:
      cmd: python -c "open('b${item}.txt', 'w').write(open('a.txt').read() + '${item}')"
      deps:
        - a.txt
      outs:
        - b${item}.txt
  c:
    cmd: python -c "open('c.txt', 'w').write(open('b0.txt').read() + open('b1.txt').read())"
    deps:
      - b0.txt
      - b1.txt
    outs:
      - c.txt
  bad:
    cmd: python refuse.py
    deps:
      - a.txt
    outs:
      - bad.txt
  slow:
    cmd: python -c "import time; time.sleep(60)"
    outs:
      - slow.txt
  nap:
    cmd: python -c "import time; time.sleep(6); open('nap.txt', 'w').write('z')"
    outs:
      - nap.txt
"""


REFUSE = "import sys\nprint('error: the ratio is out of range; set it in (0, 1)', file=sys.stderr)\nsys.exit(2)\n"
env = dvc_env


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return dvc_repo(tmp_path, DVC_YAML, {"refuse.py": REFUSE})  # refuse.py: a stage's bad-input contract


def test_the_graph_comes_from_dvc_with_every_stage_after_its_upstream(repo):
    stages = stage_graph(repo)
    names = [s.name for s in stages]
    assert sorted(names) == ["a", "b@0", "b@1", "bad", "c", "nap", "slow"]
    upstream = {s.name: s.upstream for s in stages}
    assert upstream["c"] == ("b@0", "b@1") and upstream["b@1"] == ("a",) and upstream["a"] == ()
    for s in stages:
        assert all(names.index(u) < names.index(s.name) for u in s.upstream)


def test_the_graph_is_read_back_until_dvc_yaml_or_the_params_it_uses_change(repo, monkeypatch):
    from flows import stages as stages_module

    first = stage_graph(repo)
    calls = []
    real = stages_module._dvc_stage_graph
    monkeypatch.setattr(stages_module, "_dvc_stage_graph", lambda ws: calls.append(ws) or real(ws))
    assert stage_graph(repo) == first and calls == []  # from .semiprune/stage_graph.json, no DVC
    (repo / "params.yaml").write_text("folds: [0, 1]\nratio: 0.5\n")
    assert stage_graph(repo) == first and calls == []  # no param is interpolated: the graph stands
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text().replace("foreach: [0, 1]", "foreach: ${folds}"))
    assert stage_graph(repo) == first and len(calls) == 1  # dvc.yaml changed: asked DVC again
    (repo / "params.yaml").write_text("folds: [0, 1]\nratio: 0.7\n")
    assert stage_graph(repo) == first and len(calls) == 1  # a param dvc.yaml does not use
    (repo / "params.yaml").write_text("folds: [0, 1, 2]\nratio: 0.7\n")
    assert "b@2" in [s.name for s in stage_graph(repo)] and len(calls) == 2  # the foreach items changed
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text().replace("  slow:", "  slower:"))
    assert "slower" in [s.name for s in stage_graph(repo)] and len(calls) == 3


def test_a_folder_without_dvc_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a DVC repository"):
        stage_graph(tmp_path)


def test_a_stage_runs_then_is_up_to_date_then_is_restored_from_the_run_cache(repo):
    lines = []
    first = run_stage(repo, "a", env=env(), on_line=lines.append)
    assert (first.outcome, first.returncode) == ("ran", 0)
    assert any("Running stage 'a'" in line for line in lines)
    assert run_stage(repo, "a", env=env()).outcome == "unchanged"
    assert run_stage(repo, "b@0", env=env()).outcome == "ran"
    (repo / "b0.txt").unlink()
    (repo / "dvc.lock").unlink()  # forget the run: only DVC's run-cache remembers it
    assert run_stage(repo, "b@0", env=env()).outcome == "restored"
    assert (repo / "b0.txt").read_text() == "a0"


def test_a_stage_that_refuses_its_input_fails_as_bad_input_with_its_error_in_the_tail(repo):
    assert run_stage(repo, "a", env=env()).outcome == "ran"
    result = run_stage(repo, "bad", env=env())
    assert result.outcome == "failed" and result.returncode != 0 and result.bad_input
    assert any("the ratio is out of range" in line for line in result.tail)


def test_a_stage_past_its_timeout_is_killed(repo):
    result = run_stage(repo, "slow", env=env(), timeout=4)
    assert result.outcome == "timed out" and result.seconds < 30 and not result.bad_input


def test_a_stage_starts_while_another_runs_its_command_once_dvc_has_let_go_of_the_lock(repo):
    import threading

    ended = {}

    def nap():
        assert run_stage(repo, "nap", env=env()).outcome == "ran"
        ended["nap"] = time.monotonic()

    napping = threading.Thread(target=nap)
    napping.start()
    time.sleep(2)  # nap's DVC has checked its stage and runs the command, with the lock let go
    assert run_stage(repo, "a", env=env()).outcome == "ran"  # not waiting for nap's command
    ended["a"] = time.monotonic()
    napping.join()
    assert ended["a"] < ended["nap"] - 1


def test_a_dvc_waiting_for_the_repository_lock_takes_it_within_a_tenth_of_a_second(tmp_path, monkeypatch):
    import threading

    import dvc.lock

    from flows.dvc_cli import poll_lock_often

    monkeypatch.setattr(dvc.lock, "DEFAULT_TIMEOUT", dvc.lock.DEFAULT_TIMEOUT)  # restored afterwards
    poll_lock_often()  # what `python -m flows.dvc_cli` does before DVC runs
    path = str(tmp_path / "lock")
    for _ in range(3):  # DVC's own 0.5 s steps would pass all three by luck one time in 125
        held = dvc.lock.make_lock(path, wait=True)
        held.lock()
        waiting = dvc.lock.make_lock(path, wait=True)
        taken = threading.Event()
        thread = threading.Thread(target=lambda: (waiting.lock(), taken.set()))
        thread.start()
        time.sleep(0.3)  # it is polling now
        released = time.monotonic()
        held.unlock()
        assert taken.wait(5)
        assert time.monotonic() - released < 0.1
        thread.join()
        waiting.unlock()


def test_the_cache_pass_keeps_what_is_current_leaves_what_must_run_and_answers_nothing_when_it_fails(repo):
    assert run_stage(repo, "a", env=env()).outcome == "ran"
    answer = reuse_cached(repo, ["a", "b@0", "b@1", "c"], env=env())
    assert answer == {"a": {"outcome": "unchanged", "seconds": answer["a"]["seconds"]}}  # b@0 has never run
    assert not (repo / "b0.txt").exists()  # the pass never runs a command of a stage that is not always-run
    lines = []
    assert reuse_cached(repo, ["no-such-stage"], env=env(), on_line=lines.append) == {}
    assert "every stage goes through its own task" in lines[-1]


RATIO = """
stages:
  keep:
    cmd: python -c "import yaml; open('k.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['ratio']))"
    params:
      - ratio
    outs:
      - k.txt
"""


def test_a_cache_pass_killed_before_it_writes_dvc_lock_is_repaired_by_the_next(tmp_path, monkeypatch):
    import dvc.dvcfile

    from flows.reuse import reuse

    repo = dvc_repo(tmp_path / "r", RATIO)
    for ratio in ("0.5", "0.7"):
        (repo / "params.yaml").write_text(f"ratio: {ratio}\n")
        assert run_stage(repo, "keep", env=env()).outcome == "ran"
    (repo / "params.yaml").write_text("ratio: 0.5\n")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.chdir(repo)  # where `python -m flows.reuse` runs
        patch.setattr(dvc.dvcfile.ProjectFile, "dump_stages", killed)
        with pytest.raises(KeyboardInterrupt):
            reuse(repo, ["keep"])
    assert (repo / "k.txt").read_text() == "0.5"  # restored, but dvc.lock still records the 0.7 run
    answer = reuse_cached(repo, ["keep"], env=env())
    assert answer["keep"]["outcome"] == "restored"
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, env=env(),
                            capture_output=True, text=True)
    assert json.loads(status.stdout) == {}


def test_outcome_of_reads_dvc_messages():
    assert outcome_of("score@0", ["Stage 'score@0' didn't change, skipping"]) == "unchanged"
    assert outcome_of("score@0", ["Stage 'score@0' is cached - skipping run, checking out outputs"]) == "restored"
    assert outcome_of("score@0", ["Running stage 'score@1':"]) == "unknown"


def test_a_dvc_killed_while_recording_a_stage_leaves_dvc_lock_whole_and_the_rerun_records_it(repo, tmp_path):
    import signal

    import yaml

    from flows.stages import DVC_WAITING

    assert run_stage(repo, "a", env=env()).outcome == "ran"
    before = (repo / "dvc.lock").read_text()
    marker = tmp_path / "halted"
    halt = {**env(), "SEMIPRUNE_HALT_AT": "write:dvc.lock", "SEMIPRUNE_HALT_FILE": str(marker)}
    proc = subprocess.Popen([*DVC_WAITING, "repro", "--single-item", "b@0"], cwd=repo, env=halt,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not marker.exists():  # DVC's plain write would empty dvc.lock here and have no such point
        assert proc.poll() is None and time.monotonic() < deadline, "DVC never reached its dvc.lock write"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (repo / "dvc.lock").read_text() == before  # the old record, whole
    assert [p.name for p in repo.glob(".dvc.lock.*.tmp")] == [f".dvc.lock.{proc.pid}.tmp"]
    assert run_stage(repo, "b@0", env=env()).outcome in ("ran", "restored")
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == {"a", "b@0"}
    assert not list(repo.glob(".dvc.lock.*.tmp"))  # the dead writer's file went with the next write


def test_the_flows_dvc_processes_write_dvc_lock_through_a_rename():
    # in a process of its own: the patch changes DVC for the rest of the process it runs in
    code = """
import os, sys, tempfile
from flows.dvc_cli import write_dvc_files_atomically
from dvc.utils.serialize import dump_yaml, modify_yaml
assert write_dvc_files_atomically() and write_dvc_files_atomically()
folder = tempfile.mkdtemp()
path = os.path.join(folder, "dvc.lock")
dump_yaml(path, {"schema": "2.0", "stages": {"a": {"cmd": "one"}}})
with modify_yaml(path) as data:
    data["stages"]["a"]["cmd"] = "two"
failed = False
try:
    dump_yaml(path, {"schema": "2.0", "stages": {"a": object()}})  # fails halfway through the YAML
except Exception:
    failed = True
assert failed
print(repr(open(path).read()), sorted(os.listdir(folder)), oct(os.stat(path).st_mode & 0o777))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "\"schema: '2.0'\\nstages:\\n  a:\\n    cmd: two\\n\" ['dvc.lock'] " + oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("text", ["", "stages: [a, b\n", "- a list\n", "stages: [a]\n"])
def test_an_empty_or_damaged_dvc_lock_is_one_error_naming_the_file_and_the_fix(repo, text):
    (repo / "dvc.lock").write_text(text)
    with pytest.raises(ConfigError, match=r"dvc\.lock is empty or damaged .*mv .*dvc\.lock.* run-cache"):
        stage_graph(repo)


def _empty_run_cache_entry(repo: Path) -> Path:
    """Leave the run-cache of the one recorded run as a DVC killed while saving it leaves it: the
    key's folder without a finished entry. Returns that folder."""
    entries = [p for p in (repo / ".dvc/cache/runs").glob("*/*/*") if p.is_file()]
    assert len(entries) == 1, entries
    entries[0].unlink()
    return entries[0].parent


def _forget_in_dvc_lock(repo: Path, name: str) -> None:
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    del lock["stages"][name]
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_a_run_cache_folder_a_killed_save_left_empty_does_not_fail_the_stage_for_good(repo):
    assert run_stage(repo, "a", env=env()).outcome == "ran"
    assert run_stage(repo, "b@0", env=env()).outcome == "ran"  # a has no deps: DVC keeps no run-cache entry for it
    folder = _empty_run_cache_entry(repo)
    _forget_in_dvc_lock(repo, "b@0")  # the stage must run again with the same inputs: DVC looks it up

    plain = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "b@0"], cwd=repo, env=env(),
                           capture_output=True, text=True)
    assert plain.returncode != 0 and "join() argument must be" in plain.stderr  # DVC 3.67's own lookup
    lines: list[str] = []
    answer = reuse_cached(repo, ["a", "b@0"], env=env(), on_line=lines.append)
    assert set(answer) == {"a"}  # b@0 has no run to restore: its task runs it
    assert not [line for line in lines if "Traceback" in line or "the cache pass" in line], lines
    assert run_stage(repo, "b@0", env=env()).outcome == "ran"
    assert (repo / "b0.txt").read_text() == "a0"
    assert [p.name for p in folder.iterdir()], "the rerun recorded its run"


def test_a_run_cache_lookup_leaves_a_writers_temporary_file_alone(repo):
    assert run_stage(repo, "a", env=env()).outcome == "ran"
    assert run_stage(repo, "b@0", env=env()).outcome == "ran"
    folder = _empty_run_cache_entry(repo)
    writing = folder / ".0f3c.tmp"  # another process of a shared cache, halfway through its entry
    writing.write_text("cmd: python -c \"open('b0.txt',")
    _forget_in_dvc_lock(repo, "b@0")
    assert run_stage(repo, "b@0", env=env()).outcome == "ran"
    assert writing.read_text() == "cmd: python -c \"open('b0.txt',"
    assert len([p for p in folder.iterdir() if not p.name.startswith(".")]) == 1


def test_the_flows_dvc_processes_read_finished_run_cache_entries_only():
    code = "from flows.dvc_cli import read_finished_run_cache_entries_only as f; assert f() and f()"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True)
