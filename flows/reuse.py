"""What DVC already has, taken in one process: ``python -m flows.reuse STAGE...`` (in graph order).

A stage task is a ``dvc repro --single-item`` process of its own, about a second each on two cores
even when DVC only restores the stage from its run-cache. Setting a ratio back touches four
processes that way (source, then select, audit and evaluate restored). This pass opens the
repository once and walks the stages in graph order, doing through DVC's own stage objects what
those processes would do, then writes dvc.lock once:

- a stage that always runs and runs no model (``source``, a stat of the raw files) is run;
- a stage whose inputs did not change is left as it is (``unchanged``);
- a changed stage whose run is in the run-cache with its outputs is restored (``restored``).

It never trains: a changed stage with no cached run, anything downstream of it, and any stage that
fails here is left to its own stage task, which runs it (and reports its errors) as before. DVC's
command runner is patched so that only the always-run stages can start a command.

The last line on stdout is ``semiprune-reuse: [{"name", "outcome", "seconds"}, ...]``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

MARK = "semiprune-reuse: "


class _NeedsRun(Exception):
    """A stage this pass must not run: its task will."""


def reuse(workspace: Path, names: list[str]) -> list[dict]:
    """Run, keep or restore each of ``names`` (graph order) as far as no stage needs training.
    ``workspace`` must be the working directory: DVC resolves the stages' paths against it."""
    import dvc.stage.run as dvc_run
    from dvc.repo import Repo, lock_repo

    from .dvc_cli import keep_dvc_records_whole
    from .stages import stage_graph

    keep_dvc_records_whole()  # its one rewrite of dvc.lock, too
    graph = {s.name: s for s in stage_graph(workspace)}
    may_run: set[str] = set()
    cmd_run = dvc_run.cmd_run

    def guarded(stage, *args, **kwargs):
        if stage.name not in may_run:
            raise _NeedsRun(stage.name)
        return cmd_run(stage, *args, **kwargs)

    dvc_run.cmd_run = guarded  # run_stage looks it up on each call
    repo = Repo(str(workspace), _wait_for_lock=True)
    taken: list[dict] = []
    done: set[str] = set()
    try:
        with lock_repo(repo):
            stages = {s.name: s for s in repo.index.stages}  # dvc.yaml and dvc.lock parsed once
            changed: list = []
            try:
                for name in names:
                    node, stage = graph[name], stages[name]
                    if not all(u in done for u in node.upstream):
                        continue  # upstream of it is left to the tasks, so is it
                    started = time.monotonic()
                    if node.always_changed and not node.gpu:
                        may_run.add(name)
                        outcome = "ran"
                    elif not stage.changed():
                        outcome = "unchanged"
                    else:
                        if not _cached(repo, stage):
                            continue
                        outcome = "restored"
                    if outcome != "unchanged":
                        try:
                            stage.run()  # DVC's repro of a changed stage: the run-cache restore (or, for
                            # an always-run stage, its command), then the outputs hashed and committed
                        except Exception as err:  # noqa: BLE001 - whatever went wrong, the stage's task retries it
                            print(f"{name}: left to its task ({err})", file=sys.stderr)
                            with contextlib.suppress(Exception):
                                repo.checkout(targets=name, quiet=True)  # the last good outputs back
                            continue
                        changed.append(stage)
                    done.add(name)
                    taken.append({"name": name, "outcome": outcome, "seconds": round(time.monotonic() - started, 2)})
            finally:
                # one rewrite of dvc.lock for every stage taken (DVC's repro rewrites it per stage, 0.2 s
                # each). Killed before it, the outputs on disk differ from dvc.lock: DVC then sees those
                # stages as changed and the next run restores them again.
                for path in dict.fromkeys(s.dvcfile.path for s in changed):
                    group = [s for s in changed if s.dvcfile.path == path]
                    group[0].dvcfile.dump_stages(group, update_pipeline=False)
    finally:
        dvc_run.cmd_run = cmd_run
        repo.close()
    return taken


def _cached(repo, stage) -> bool:
    """Whether DVC's run-cache holds a run of ``stage`` with its inputs as they are now, outputs
    included, without touching the workspace. The run-cache key is the inputs' hashes as they are
    now; they are put back afterwards, since DVC would take a stage holding them for unchanged."""
    import logging

    from dvc.stage import cache

    recorded = [(dep, dict(vars(dep))) for dep in stage.deps]
    level = cache.logger.level
    cache.logger.setLevel(logging.WARNING)  # the real restore says "is cached - skipping run"; this one need not
    try:
        stage.save_deps()
        repo.stage_cache.restore(stage, dry=True)
        return True
    except cache.RunCacheNotFoundError:
        return False
    finally:
        cache.logger.setLevel(level)
        for dep, state in recorded:
            vars(dep).clear()
            vars(dep).update(state)


def main(argv: list[str]) -> int:
    import dvc.logger  # noqa: F401 - sets up DVC's messages ("Stage 'select' is cached - skipping run")

    taken = reuse(Path.cwd(), argv)
    print(MARK + json.dumps(taken), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
