"""The curation flow: every DVC stage of a workspace as a Prefect task, in the order DVC's graph gives.

Prefect decides when and where (parallel folds, retries, timeouts, logs, artifacts); DVC alone
decides what is stale: each task is ``dvc repro --single-item STAGE``, which runs the stage,
restores it from the run-cache, or finds it up to date. Stages that do not depend on each other
(the ``score@k`` folds) run side by side, on threads or on a Dask cluster. On threads, at most
``workers`` stages that run a model (``meta: {gpu: true}``) run at once; the light stages that run
none (``audit`` after ``select``, say) go beside them instead of waiting for a slot.

Starting a DVC process per stage costs about a second, so the flow first makes one pass over
the stages in a single DVC process (``flows/reuse.py``): it runs the stages that always run and no
model (``source``), and keeps every stage whose inputs did not change and restores every one whose
run is in the run-cache, in graph order. Only the stages that pass leaves (those that must train,
and what is downstream of them) start a ``dvc repro`` of their own; a ratio-only change that was
run before needs none. ``semiprune run`` starts that pass before Prefect has loaded, so the two
overlap.

The stages that do start start warm: the flow runs a stage server that imports torch once, and the
stage command DVC starts hands its work to a process forked from it (``tasks/_warm_start.py``),
which spares every model stage the second or more that importing torch costs.

A stage that fails is retried with back-off, unless it refused its input (exit code 2) or ran out
of time: a retry would fail the same way. A failed stage fails the flow; the stages after it do not
run. With GPUs, each model-running stage (``meta: {gpu: true}``) gets one device through
``CUDA_VISIBLE_DEVICES`` and holds that device's Prefect concurrency slot while it runs, so two flow
runs (or two folds) never share a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import shutil
import socket
import subprocess
import threading
import uuid
from dataclasses import asdict
from pathlib import Path

import prefect.flow_engine
from prefect import flow, get_run_logger, task
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from tasks._warm_start import ENV as WARM_START_ENV

from .publish import publish_run
from .stages import StageRun, reuse_cached, run_stage, run_stages, stage_server
from .workspace import dvc_env, run_lock


def _skip_heartbeat_join() -> None:
    """End flow runs without waiting for Prefect's heartbeat thread.

    Prefect's sync flow engine joins that thread when a run ends, and the thread sleeps in 1 s
    steps, so every run waited up to a second for it (0.95 s after a short one, such as a reverted
    ratio). Its async engine skips the join; this does the same. The thread is a daemon that starts
    no heartbeat once the run has ended, so the crash-detecting heartbeats are unchanged.
    """
    send = getattr(prefect.flow_engine, "_send_heartbeats", None)
    if (send is not None and not isinstance(send, functools.partial)
            and "join_on_exit" in inspect.signature(send).parameters):
        prefect.flow_engine._send_heartbeats = functools.partial(send, join_on_exit=False)


_skip_heartbeat_join()


class StageFailed(RuntimeError):
    def __init__(self, run: StageRun):
        self.run = run
        # bad input: the stage's own `error:` line says what is wrong and how to fix it, where
        # DVC's last line would only say that the stage exited with 2
        own = next((line for line in reversed(run.tail) if line.startswith("error: ")), None)
        if run.bad_input and own:
            super().__init__(f"stage {run.name}: {own.removeprefix('error: ')}")
            return
        last = next((line for line in reversed(run.tail) if line.strip()), "")
        super().__init__(f"stage {run.name} {run.outcome} (DVC exit {run.returncode}): {last}")


def _retry_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, StageFailed) and (exc.run.bad_input or exc.run.outcome == "timed out"))


#: per flow run in this process: a semaphore bounding how many model stages run at once
_MODEL_SLOTS: dict[str, threading.BoundedSemaphore] = {}
#: per flow run in this process: its cache pass, started before Prefect loaded (``run_curation(early=...)``)
_EARLY: dict[str, subprocess.Popen] = {}


def _model_slot(key: str | None) -> contextlib.AbstractContextManager:
    # a function of its own, so a task shipped to Dask pickles a reference to it, not the semaphores
    return _MODEL_SLOTS.get(key) or contextlib.nullcontext()


def gpu_slot(device: str) -> str:
    """The Prefect global concurrency limit guarding one GPU of this machine."""
    return f"semiprune-gpu-{socket.gethostname()}-{device}"


def visible_gpus() -> list[str]:
    """The GPUs stages may use: ``CUDA_VISIBLE_DEVICES`` if set, else what ``nvidia-smi`` lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [str(i) for i, line in enumerate(proc.stdout.splitlines()) if line.startswith("GPU ")] if proc.returncode == 0 else []


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_retry_transient,
      cache_policy=None, persist_result=False)
def stage_task(workspace: str, project: str, name: str, timeout: float | None = None, *, done: dict | None = None,
               force: bool = False, pull: bool = False, device: str | None = None, slots: str | None = None,
               server: str | None = None) -> dict:
    """Run one stage through DVC; its output goes line by line to the task's log.

    ``done``: what the cache pass did with the stage ({outcome, seconds}), so no process runs.
    ``device``: the GPU this stage gets to itself for as long as it runs.
    ``slots``: the flow run's model-stage semaphore (a key of ``_MODEL_SLOTS``), held while it runs.
    ``server``: the run's warm-start server (``stage_server``); where it cannot be reached (a Dask
    worker on another machine) the stage starts cold.
    """
    record = {"name": name, "device": device, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    if done is not None:
        return {**record, "outcome": done["outcome"], "returncode": 0, "seconds": done["seconds"]}
    log = get_run_logger()
    env = dvc_env(Path(project))
    guard = contextlib.nullcontext()
    if device is not None:
        from prefect.concurrency.sync import concurrency

        env["CUDA_VISIBLE_DEVICES"] = device
        guard = concurrency(gpu_slot(device), occupy=1, strict=True)
    if server:
        env[WARM_START_ENV] = server
    with _model_slot(slots), guard:
        result = run_stage(Path(workspace), name, env=env, timeout=timeout, force=force, pull=pull,
                           on_line=log.info)
    if result.outcome in ("failed", "timed out"):
        raise StageFailed(result)
    log.info("stage %s %s in %.1f s", name, result.outcome, result.seconds)
    return {**record, **{k: v for k, v in asdict(result).items() if k not in ("tail", "name")}}


@task(task_run_name="cache pass", cache_policy=None, persist_result=False)
def cache_pass(workspace: str, project: str, names: list[str], timeout: float | None = None,
               early: str | None = None) -> dict[str, dict]:
    """The stages one DVC process could run (the always-run ones), keep or restore: {name: {outcome, seconds}}.
    ``early``: the key of that process in ``_EARLY`` when it was started before the flow.
    No retries: whatever it leaves, the stage tasks do."""
    return reuse_cached(Path(workspace), names, env=dvc_env(Path(project)), timeout=timeout,
                        on_line=get_run_logger().info, started=_EARLY.pop(early, None) if early else None)


@flow(name="semiprune-curation", log_prints=True)
def curation(workspace: str, project: str | None = None, stage_timeout: float | None = None,
             stages: list[str] | None = None, force: bool = False, gpus: list[str] | None = None,
             pull: bool = False, publish_rows: int = 1000, model_workers: int | None = None,
             early: str | None = None) -> list[dict]:
    """Run the stages of ``workspace`` (a DVC repository; ``stages``: only those and their upstream).

    ``pull``: take each stage from the team remote when a run with the same inputs is there.
    ``model_workers``: at most this many stages that run a model at once (None: no bound but the
    task runner's); stages without a model are not counted.
    ``early``: the key in ``_EARLY`` of this run's cache pass, started before the flow.

    Returns one record per stage (outcome, seconds, device, worker) and publishes a summary and a
    table of the pruned samples as Prefect artifacts.
    """
    ws, proj = Path(workspace), project or workspace
    slots = None
    if model_workers:
        slots = str(uuid.uuid4())
        _MODEL_SLOTS[slots] = threading.BoundedSemaphore(model_workers)
    try:
        with run_lock(ws):  # a no-op under `semiprune run`, which holds it already; guards served runs
            return _curate(ws, proj, stage_timeout, stages, force, gpus, pull, publish_rows, slots, early)
    finally:
        _MODEL_SLOTS.pop(slots, None)


def _curate(ws: Path, proj: str, stage_timeout, stages, force: bool, gpus, pull: bool, publish_rows: int,
            slots: str | None, early: str | None) -> list[dict]:
    graph = run_stages(ws, stages)
    gpus = visible_gpus() if gpus is None else list(gpus)
    if gpus:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            for device in gpus:
                client.upsert_global_concurrency_limit_by_name(gpu_slot(device), limit=1)

    # --force runs every stage; otherwise one process takes what DVC already has (see the module doc)
    done = {} if force else cache_pass(str(ws), proj, [s.name for s in graph], stage_timeout, early)
    # the stages left start warm, forked from a server that imported torch once (tasks/_warm_start.py)
    warm = stage_server(ws, dvc_env(Path(proj))) if len(done) < len(graph) else contextlib.nullcontext()
    with warm as server:
        futures, gpu_stages = {}, 0
        for stage in graph:
            device = None
            if stage.gpu and gpus and stage.name not in done:
                device, gpu_stages = gpus[gpu_stages % len(gpus)], gpu_stages + 1
            futures[stage.name] = stage_task.with_options(task_run_name=stage.name).submit(
                str(ws), proj, stage.name, stage_timeout, done=done.get(stage.name), force=force, pull=pull,
                device=device, slots=slots if stage.gpu else None, server=server,
                wait_for=[futures[u] for u in stage.upstream if u in futures])
        for future in futures.values():
            future.wait()

    records, failed = [], None
    for stage in graph:
        future = futures[stage.name]
        state = future.state
        if state.is_completed():
            records.append(future.result())
            continue
        outcome = "not run"  # an upstream stage failed
        if state.is_failed() or state.is_crashed():
            error = state.result(raise_on_failure=False)
            outcome = error.run.outcome if isinstance(error, StageFailed) else "failed"
            failed = failed or error
        records.append({"name": stage.name, "outcome": outcome, "returncode": None, "seconds": 0.0,
                        "device": None, "worker": None})
    publish_run(ws, records, max_rows=publish_rows, project=Path(proj))
    if failed is not None:
        # a Failed state, not a raise: the run is marked failed and the caller still gets the
        # exception, without Prefect printing a traceback above the one-line error
        error = failed if isinstance(failed, BaseException) else RuntimeError(str(failed))
        return Failed(message=str(error), data=error)
    return records


def task_runner(dask_address: str | None = None, dask_workers: int | None = None):
    """Threads on this machine (default; the flow's ``model_workers`` bounds the model stages), an
    existing Dask cluster, or a local Dask cluster (its workers bound every stage)."""
    if dask_address or dask_workers:
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner()


def run_curation(workspace: Path, *, project: Path | None = None, workers: int = 2, stage_timeout: float | None = None,
                 stages: list[str] | None = None, force: bool = False, gpus: list[str] | None = None,
                 pull: bool = False, dask_address: str | None = None, dask_workers: int | None = None,
                 wait: bool = False, early: subprocess.Popen | None = None) -> list[dict]:
    """The curation flow with at most ``workers`` model stages at a time (the folds fan out; stages
    that run no model go beside them).

    The workspace's run lock is taken before the flow starts, so a busy workspace is one line of
    error (or, with ``wait``, a queue) rather than a failed flow run. ``early``: this run's cache
    pass (``start_cache_pass``), started by a caller that holds the lock already.
    """
    runner = task_runner(dask_address, dask_workers)
    key = None
    if early is not None:
        key = str(uuid.uuid4())
        _EARLY[key] = early
    try:
        with run_lock(Path(workspace), wait=wait):
            return curation.with_options(task_runner=runner)(
                str(workspace), str(project) if project else None, stage_timeout, stages, force, gpus, pull,
                model_workers=None if dask_address or dask_workers else workers,  # Dask's workers bound it there
                early=key)
    finally:
        _EARLY.pop(key, None)  # still here if the flow never asked for it: its starter waits for it
