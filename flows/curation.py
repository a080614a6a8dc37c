"""The curation flow: every DVC stage of a workspace as a Prefect task, in the order DVC's graph gives.

Prefect decides when and where (parallel folds, retries, timeouts, logs, artifacts); DVC alone
decides what is stale: each task is ``dvc repro --single-item STAGE``, which runs the stage,
restores it from the run-cache, or finds it up to date. Stages that do not depend on each other
(the ``score@k`` folds) run side by side, bounded by ``workers``.

A stage that fails is retried with back-off, unless it refused its input (exit code 2): a retry
would fail the same way. A failed stage fails the flow; the stages after it do not run.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from .stages import StageRun, run_stage, stage_graph
from .workspace import dvc_env


class StageFailed(RuntimeError):
    def __init__(self, run: StageRun):
        self.run = run
        last = next((line for line in reversed(run.tail) if line.strip()), "")
        super().__init__(f"stage {run.name} {run.outcome} (exit {run.returncode}): {last}")


def _retry_unless_bad_input(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, StageFailed) and exc.run.bad_input)


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_retry_unless_bad_input,
      cache_policy=None, persist_result=False)
def stage_task(workspace: str, project: str, name: str, timeout: float | None) -> dict:
    """Run one stage through DVC; its output goes line by line to the task's log."""
    log = get_run_logger()
    result = run_stage(Path(workspace), name, env=dvc_env(Path(project)), timeout=timeout, on_line=log.info)
    if result.outcome in ("failed", "timed out"):
        raise StageFailed(result)
    log.info("stage %s %s in %.1f s", name, result.outcome, result.seconds)
    return {k: v for k, v in asdict(result).items() if k != "tail"}


@flow(name="semiprune-curation", log_prints=True)
def curation(workspace: str, project: str | None = None, stage_timeout: float | None = None) -> list[dict]:
    """Run every stage of ``workspace`` (a DVC repository); return one record per stage."""
    ws = Path(workspace)
    futures = {}
    for stage in stage_graph(ws):
        futures[stage.name] = stage_task.with_options(task_run_name=stage.name).submit(
            str(ws), project or str(ws), stage.name, stage_timeout, wait_for=[futures[u] for u in stage.upstream])
    records, failed = [], None
    for name, future in futures.items():
        future.wait()
        state = future.state
        if state.is_completed():
            records.append(future.result())
            continue
        outcome = "not run"  # an upstream stage failed
        if state.is_failed() or state.is_crashed():
            error = state.result(raise_on_failure=False)
            outcome = error.run.outcome if isinstance(error, StageFailed) else "failed"
            failed = failed or error
        records.append({"name": name, "outcome": outcome, "returncode": None, "seconds": 0.0})
    create_markdown_artifact(key="semiprune-run", markdown=_summary(records), description="stages of this run")
    if failed is not None:
        raise failed if isinstance(failed, BaseException) else RuntimeError(str(failed))
    return records


def run_curation(workspace: Path, *, project: Path | None = None, workers: int = 2,
                 stage_timeout: float | None = None) -> list[dict]:
    """The curation flow with at most ``workers`` stages at a time (the folds fan out)."""
    return curation.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))(
        str(workspace), str(project) if project else None, stage_timeout)


def _summary(records: list[dict]) -> str:
    rows = "\n".join(f"| {r['name']} | {r['outcome']} | {r['seconds']:.1f} |" for r in records)
    reused = [r["name"] for r in records if r["outcome"] in ("restored", "unchanged")]
    return (f"# semiprune run\n\n| stage | outcome | seconds |\n|---|---|---|\n{rows}\n\n"
            f"Re-used from cache: {', '.join(reused) or 'nothing'}.\n")
