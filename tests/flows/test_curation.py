"""The curation flow under Prefect's test harness, on tiny real DVC repositories."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.curation import StageFailed, run_curation

from .conftest import dvc_env, dvc_repo

# count.py NAME: append a line to NAME.runs each time it runs (how many times a stage executed)
COUNT = "import sys\nopen(sys.argv[1] + '.runs', 'a').write('x\\n')\n"
PIPELINE = """
stages:
  a:
    cmd: python count.py a && python -c "open('a.txt', 'w').write('a')"
    outs:
      - a.txt
  fold:
    foreach: [0, 1]
    do:
      cmd: python count.py fold${item} && python -c "open('f${item}.txt', 'w').write(open('a.txt').read())"
      deps:
        - a.txt
      outs:
        - f${item}.txt
  join:
    cmd: python count.py join && python -c "open('j.txt', 'w').write(open('f0.txt').read() + open('f1.txt').read())"
    deps:
      - f0.txt
      - f1.txt
    outs:
      - j.txt
"""
BAD = "import sys\nopen('bad.runs', 'a').write('x\\n')\nprint('error: select.ratio must be in (0, 1); fix it', file=sys.stderr)\nsys.exit(2)\n"
FLAKY = "import sys\nopen('flaky{i}.runs', 'a').write('x\\n')\nif len(open('flaky{i}.runs').read()) < 4: sys.exit(1)\nopen('f{i}.txt', 'w').write('ok')\n"


def runs(repo: Path, name: str) -> int:
    path = repo / f"{name}.runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_every_stage_runs_in_graph_order_then_everything_is_reused(prefect_harness, tmp_path):
    repo = dvc_repo(tmp_path / "p", PIPELINE, {"count.py": COUNT})
    first = run_curation(repo, workers=2)
    assert [r["name"] for r in first][0] == "a" and [r["name"] for r in first][-1] == "join"
    assert {r["name"]: r["outcome"] for r in first} == {"a": "ran", "fold@0": "ran", "fold@1": "ran", "join": "ran"}
    assert (repo / "j.txt").read_text() == "aa"
    second = run_curation(repo, workers=2)
    assert {r["outcome"] for r in second} == {"unchanged"}
    from prefect.artifacts import Artifact

    summary = Artifact.get("semiprune-run")  # the latest run's summary
    assert "| join | unchanged |" in summary.data and "Re-used from cache: a, fold@0, fold@1, join" in summary.data
    assert [runs(repo, n) for n in ("a", "fold0", "fold1", "join")] == [1, 1, 1, 1]


def test_a_stage_that_refuses_its_input_fails_the_flow_once_and_later_stages_do_not_run(prefect_harness, tmp_path):
    pipeline = PIPELINE.replace("python count.py fold${item} && python -c", "python bad.py && python -c")
    repo = dvc_repo(tmp_path / "p", pipeline, {"count.py": COUNT, "bad.py": BAD})
    with pytest.raises(StageFailed, match=r"^stage fold@\d: select.ratio must be in \(0, 1\); fix it$"):
        run_curation(repo, workers=2)
    assert runs(repo, "bad") == 2  # each fold once: bad input is not retried
    assert runs(repo, "join") == 0 and not (repo / "j.txt").exists()
    assert (repo / "a.txt").exists()  # what succeeded stays


def test_a_transient_failure_is_retried(prefect_harness, tmp_path):
    pipeline = PIPELINE.replace(
        "cmd: python count.py fold${item} && python -c \"open('f${item}.txt', 'w').write(open('a.txt').read())\"",
        "cmd: python flaky${item}.py")
    repo = dvc_repo(tmp_path / "p", pipeline, {"count.py": COUNT, "flaky0.py": FLAKY.format(i=0),
                                               "flaky1.py": FLAKY.format(i=1)})
    records = run_curation(repo, workers=1)
    assert {r["name"]: r["outcome"] for r in records}["join"] == "ran"
    assert runs(repo, "flaky0") == runs(repo, "flaky1") == 2  # one failure, then a retry that succeeds


def test_a_stage_past_its_timeout_is_killed_and_not_retried(prefect_harness, tmp_path):
    pipeline = PIPELINE.replace("python count.py join && python -c",
                                "python count.py join && python -c \"import time; time.sleep(60)\" && python -c")
    repo = dvc_repo(tmp_path / "p", pipeline, {"count.py": COUNT})
    with pytest.raises(StageFailed, match="stage join timed out"):
        run_curation(repo, workers=2, stage_timeout=5)
    assert runs(repo, "join") == 1  # once: a stage that ran out of time would do so again
    assert (repo / "f0.txt").exists() and not (repo / "j.txt").exists()


RATIO_PIPELINE = """
stages:
  source:
    cmd: python count.py source && python -c "open('s.txt', 'w').write('s')"
    outs:
      - s.txt:
          cache: false
    always_changed: true
  train:
    meta: {gpu: true}
    cmd: python count.py train && python -c "open('t.txt', 'w').write(open('s.txt').read())"
    deps:
      - s.txt
    outs:
      - t.txt
  select:
    cmd: python count.py select && python -c "import yaml; open('k.txt', 'w').write(str(yaml.safe_load(open('params.yaml'))['ratio']))"
    deps:
      - t.txt
    params:
      - ratio
    outs:
      - k.txt
  evaluate:
    meta: {gpu: true}
    cmd: python count.py evaluate && python -c "open('e.txt', 'w').write(open('k.txt').read() + '!')"
    deps:
      - k.txt
    outs:
      - e.txt
"""


@pytest.mark.parametrize("early", [False, True], ids=["pass-in-flow", "pass-started-before-flow"])
def test_a_reverted_param_is_restored_by_the_cache_pass_without_a_dvc_process_per_stage(prefect_harness, tmp_path,
                                                                                         monkeypatch, early):
    import flows.curation as curation
    from flows.stages import run_stages, start_cache_pass

    repo = dvc_repo(tmp_path / "p", RATIO_PIPELINE, {"count.py": COUNT})
    for ratio in ("0.5", "0.7"):
        (repo / "params.yaml").write_text(f"ratio: {ratio}\n")
        run_curation(repo, workers=1)
    per_stage = []
    real = curation.run_stage
    monkeypatch.setattr(curation, "run_stage", lambda ws, name, **kw: per_stage.append(name) or real(ws, name, **kw))

    (repo / "params.yaml").write_text("ratio: 0.5\n")
    started = start_cache_pass(repo, [s.name for s in run_stages(repo)], env=dvc_env()) if early else None  # as `semiprune run` does
    records = {r["name"]: r["outcome"] for r in run_curation(repo, workers=1, early=started)}
    assert records == {"source": "ran", "train": "unchanged", "select": "restored", "evaluate": "restored"}
    assert curation._EARLY == {} and (started is None or started.returncode == 0)  # the flow read it to its end
    assert per_stage == []  # all of it in the one cache-pass process
    assert (repo / "e.txt").read_text() == "0.5!"
    assert [runs(repo, n) for n in ("source", "train", "select", "evaluate")] == [3, 1, 2, 2]  # only source re-ran

    (repo / "params.yaml").write_text("ratio: 0.9\n")  # never run: the pass leaves select and what follows
    records = {r["name"]: r["outcome"] for r in run_curation(repo, workers=1)}
    assert records == {"source": "ran", "train": "unchanged", "select": "ran", "evaluate": "ran"}
    assert per_stage == ["select", "evaluate"] and (repo / "e.txt").read_text() == "0.9!"
    assert [runs(repo, n) for n in ("source", "train", "select", "evaluate")] == [4, 1, 3, 3]  # each once
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, capture_output=True, text=True)
    assert json.loads(status.stdout) == {"source": ["always changed"]}  # dvc.lock records what is on disk


def test_a_flow_run_ends_without_waiting_for_prefects_heartbeat_thread(prefect_harness):
    from prefect import flow

    @flow
    def short() -> int:  # any flow run in a process that imported flows.curation
        return 1

    short()
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        short()
        seconds.append(time.perf_counter() - start)
    # joining the heartbeat thread, which sleeps in 1 s steps, made each of these take over 0.95 s
    assert min(seconds) < 0.5, seconds


WARM_PIPELINE = """
stages:
  first:
    cmd: python -m tasks.probe first
    outs:
      - first.json
  model:
    meta: {gpu: true}
    cmd: python -m tasks.probe model
    deps:
      - first.json
    outs:
      - model.json
"""
# tasks.probe NAME: write NAME.json saying whether torch came preloaded; `first` waits for the run's
# stage server to listen (it imports torch first), so the stage after it must find it
WARM_PROBE = """
import json, os, sys, time
name, server = sys.argv[1], os.environ.get("SEMIPRUNE_STAGE_SERVER")
warm = "torch" in sys.modules
deadline = time.monotonic() + 120
while name == "first" and server and not os.path.exists(server) and time.monotonic() < deadline:
    time.sleep(0.05)
json.dump({"warm": warm, "server": server}, open(name + ".json", "w"))
"""


def test_the_stages_of_a_flow_run_start_warm_from_a_server_that_ends_with_the_run(prefect_harness, tmp_path):
    repo = dvc_repo(tmp_path / "p", WARM_PIPELINE)
    (repo / "tasks").mkdir()
    for name in ("__init__.py", "_warm_start.py"):
        (repo / "tasks" / name).write_text((Path(__file__).resolve().parents[2] / "tasks" / name).read_text())
    (repo / "tasks" / "probe.py").write_text(WARM_PROBE)
    records = run_curation(repo, workers=1)
    assert {r["name"]: r["outcome"] for r in records} == {"first": "ran", "model": "ran"}
    first, model = (json.loads((repo / f"{n}.json").read_text()) for n in ("first", "model"))
    assert first["warm"] or first["server"]  # started before the server listened: cold, with its address
    assert model["warm"]  # forked with torch imported, where a cold start imports it itself
    import psutil

    def serves_repo(p) -> bool:
        try:
            return "tasks._warm_start" in " ".join(p.cmdline()) and p.cwd() == str(repo)
        except psutil.Error:
            return False

    assert not any(serves_repo(p) for p in psutil.process_iter())  # the server went with the run
