"""Where the fold stages run: one GPU each, never two runs on one GPU, and on a Dask cluster."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows.curation import run_curation

from .conftest import dvc_repo

# stamp.py NAME: record the GPU this stage was given, its process and when it ran (held for 1.5 s)
STAMP = """import json, os, sys, time
start = time.time()
time.sleep(1.5)
json.dump({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getppid(), "start": start, "end": time.time()},
          open(sys.argv[1] + ".json", "w"))
"""
PIPELINE = """
stages:
  a:
    cmd: python -c "open('a.txt', 'w').write('a')"
    outs:
      - a.txt
  fold:
    foreach: [0, 1]
    do:
      meta: {gpu: true}
      cmd: python stamp.py fold${item}
      deps:
        - a.txt
      outs:
        - fold${item}.json
"""


def stamp(repo: Path, name: str) -> dict:
    return json.loads((repo / f"{name}.json").read_text())


def test_each_fold_gets_its_own_gpu(prefect_harness, tmp_path):
    repo = dvc_repo(tmp_path / "p", PIPELINE, {"stamp.py": STAMP})
    records = {r["name"]: r for r in run_curation(repo, workers=2, gpus=["0", "1"])}
    assert {stamp(repo, "fold0")["gpu"], stamp(repo, "fold1")["gpu"]} == {"0", "1"}
    assert records["fold@0"]["device"] != records["fold@1"]["device"]
    assert records["a"]["device"] is None  # a stage without meta.gpu gets no device


def test_two_runs_never_share_one_gpu(prefect_harness, tmp_path):
    repos = [dvc_repo(tmp_path / f"p{i}", PIPELINE, {"stamp.py": STAMP}) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:  # two flow runs at once, each allowed two stages at a time
        list(pool.map(lambda r: run_curation(r, workers=2, gpus=["7"]), repos))
    spans = sorted((s["start"], s["end"]) for r in repos for s in (stamp(r, "fold0"), stamp(r, "fold1")))
    assert all(s["gpu"] == "7" for r in repos for s in (stamp(r, "fold0"), stamp(r, "fold1")))
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans


SIDE = PIPELINE.replace("      cmd: python stamp.py fold${item}", "      cmd: python stamp.py fold${item} && echo ${item}") + """
  side:
    cmd: python stamp.py side
    deps:
      - a.txt
    outs:
      - side.json
"""


def test_workers_bound_the_model_stages_and_light_stages_go_beside_them(prefect_harness, tmp_path):
    repo = dvc_repo(tmp_path / "p", SIDE, {"stamp.py": STAMP})
    run_curation(repo, workers=1, gpus=[])
    folds = sorted((stamp(repo, n)["start"], stamp(repo, n)["end"]) for n in ("fold0", "fold1"))
    assert folds[0][1] <= folds[1][0], folds  # one model stage at a time
    side = stamp(repo, "side")
    assert any(side["start"] < end and start < side["end"] for start, end in folds), (side, folds)  # not queued behind them


def test_without_gpus_nothing_is_pinned(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    repo = dvc_repo(tmp_path / "p", PIPELINE, {"stamp.py": STAMP})
    records = run_curation(repo, workers=2)
    assert all(r["device"] is None for r in records)


def test_the_folds_run_on_a_two_worker_local_dask_cluster(prefect_harness, tmp_path):
    repo = dvc_repo(tmp_path / "p", PIPELINE, {"stamp.py": STAMP})
    records = {r["name"]: r for r in run_curation(repo, dask_workers=2, gpus=[])}
    assert {records[n]["outcome"] for n in ("a", "fold@0", "fold@1")} == {"ran"}
    workers = {records[n]["worker"] for n in ("fold@0", "fold@1")}
    assert all(not w.endswith(f":{os.getpid()}") for w in workers), "the folds ran in Dask worker processes"
    # two folds ready at once go to the two idle workers (whether their few seconds overlap depends
    # on how fast each DVC process starts, so that is not asserted)
    assert len(workers) == 2
