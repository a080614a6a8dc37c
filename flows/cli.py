"""The ``semiprune`` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from semiprune_core import __version__
from semiprune_core.config import param_diff
from semiprune_core.errors import ConfigError, SemiPruneError

from . import prefect_server, team_cache, workspace


PROFILE_DIR = workspace.PROFILES


def _project(path: str | None) -> Path:
    start = Path(path or ".").resolve()
    for candidate in [start, *start.parents]:
        if (candidate / "dvc.yaml").exists() and (candidate / "params.yaml").exists() and (candidate / PROFILE_DIR).is_dir():
            return candidate
    raise SemiPruneError(f"no semiprune project at or above {start}", "cd into the project, or pass --project PATH")


def _where(args) -> tuple[Path, Path, dict]:
    """(project, workspace, params) for a command with --profile / --set."""
    project = _project(args.project)
    params = workspace.effective_params(project, profile=args.profile, overrides=args.set)
    if not args.profile and not args.set:
        return project, project, params
    name = args.name or workspace.workspace_name(args.profile, args.set)
    return project, workspace.ensure_workspace(project, name, params), params


def _prepared(args) -> tuple[Path, Path]:
    """(project, workspace) with a DVC repository, its stale locks cleared."""
    project, ws, _ = _where(args)
    if not (ws / ".dvc").is_dir():
        raise SemiPruneError(f"{ws} is not a DVC repository", "run `dvc init` there (or clone the project again)")
    if ws != project:
        print(f"semiprune: workspace {ws.relative_to(project)} (params.yaml there is the merged result)", file=sys.stderr)
    stale = workspace.clear_stale_dvc_locks(ws)
    if stale:
        print(f"semiprune: cleared DVC locks left by killed run(s) (PID {', '.join(map(str, stale))})", file=sys.stderr)
    return project, ws


def _gpus(text: str | None) -> list[str] | None:
    if text is None or text == "auto":
        return None
    return [] if text == "none" else [d.strip() for d in text.split(",") if d.strip()]


def _workers(args, params: dict) -> int:
    """Model stages at a time: ``--workers``, else one per GPU, else as many as the CPU has room for.

    A CPU stage uses ``base.threads`` torch threads (0 = every core). Two such stages at once on
    the same cores run slower than one after the other (each fold took 3.5x longer on 2 cores), and
    lowering a stage's threads behind its back would change its float sums, so by default the
    flow only runs stages side by side when their threads fit the cores.
    """
    if args.workers:
        return args.workers
    from .curation import visible_gpus

    gpus = _gpus(args.gpus)
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        return len(gpus)
    cores = os.cpu_count() or 1
    return max(1, cores // (params["base"].get("threads") or cores))


def _curate(args, project: Path, ws: Path, stages: list[str] | None = None) -> list[dict]:
    from .stages import run_stages, start_cache_pass

    force = getattr(args, "force", False)
    with workspace.run_lock(ws, wait=args.wait):
        # the cache pass needs no Prefect: started now, it runs while Prefect loads
        early = None if force else start_cache_pass(ws, [s.name for s in run_stages(ws, stages)],
                                                    env=workspace.dvc_env(project))
        from .curation import StageFailed, run_curation

        try:
            return run_curation(ws, project=project, workers=_workers(args, yaml.safe_load((ws / "params.yaml").read_text())), stage_timeout=args.stage_timeout,
                                stages=stages, force=force, gpus=_gpus(args.gpus),
                                pull=getattr(args, "pull", False), dask_address=args.dask_address,
                                dask_workers=args.dask_workers, wait=args.wait, early=early)
        except StageFailed as err:
            raise StageError.of(err) from None
        finally:
            if early is not None and early.returncode is None:  # the flow never read it (it failed to start):
                early.communicate()  # let it finish before the lock goes, it may be restoring outputs


class StageError(Exception):
    """A stage failed; the command exits with the stage's exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.exit_code = code

    @classmethod
    def of(cls, err) -> StageError:
        """From a ``StageFailed``: exit 2 when the stage refused its input, else 1."""
        return cls(str(err), 2 if err.run.bad_input else 1)


def _print_records(records: list[dict]) -> None:
    for r in records:
        device = f"  GPU {r['device']}" if r.get("device") else ""
        print(f"  {r['name']:<14} {r['outcome']:<10} {r['seconds']:7.1f} s{device}", file=sys.stderr)


def cmd_run(args) -> int:
    project, ws = _prepared(args)
    if args.pull or args.push:
        team_cache.prepare(project, ws, write=args.push)
    records = _curate(args, project, ws, args.stages or None)
    _print_records(records)
    if args.push:
        team_cache.push(project, ws)
    print(f"semiprune: done; outputs under {ws / 'artifacts'}, metrics under {ws / 'metrics'}", file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    from .stages import stage_graph, stale_downstream, stale_stages

    project, ws = _prepared(args)
    graph = stage_graph(ws)
    stale = stale_stages(ws, env=workspace.dvc_env(project))
    lock = ws / "dvc.lock"
    recorded = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {}
    locked = set(recorded)
    current = yaml.safe_load((ws / "params.yaml").read_text()) or {}
    # a stage that only runs because dvc.yaml says always_changed (source: a stat of the raw files)
    # changes nothing downstream unless its output changes, which only running it can tell
    checks = {s.name for s in graph if s.always_changed and s.name in locked and stale.get(s.name) == ["always runs"]}
    after = stale_downstream(graph, set(stale) - checks)
    rows = []
    for stage in graph:
        if stage.name in checks:
            rows.append({"stage": stage.name, "state": "checks", "why": ["runs on every repro (always_changed); cheap"]})
        elif stage.name in stale and stage.name not in locked:
            rows.append({"stage": stage.name, "state": "stale",
                         "why": ["not run in this workspace yet (DVC restores it if the run-cache has the same run)"]})
        elif stage.name in stale:
            old = recorded[stage.name].get("params", {}).get("params.yaml", {})
            why = [r for r in stale[stage.name] if not r.startswith("params")]
            rows.append({"stage": stage.name, "state": "stale", "why": [f"param {k} {a!r} -> {b!r}" for k, a, b in param_diff(old, {k: current.get(k) for k in old})] + why})
        elif stage.name in after:
            ups = [u for u in stage.upstream if u in after]
            rows.append({"stage": stage.name, "state": "may re-run",
                         "why": [f"if {', '.join(ups)} produce{'s' if len(ups) == 1 else ''} new outputs"]})
        else:
            rows.append({"stage": stage.name, "state": "up to date", "why": []})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        why = row["why"] if len(row["why"]) <= 4 else [*row["why"][:4], f"{len(row['why']) - 4} more (--json lists all)"]
        print(f"{row['stage']:<14} {row['state']:<11} {'; '.join(why)}".rstrip())
    return 0


def cmd_sweep(args) -> int:
    from .sweep import plan_sweep, run_sweep

    project = _project(args.project)
    plan = plan_sweep(project, profile=args.profile, overrides=args.set, ratios=args.ratios, strategies=args.strategies)
    print(f"semiprune: sweep of {len(plan)} runs ({len(args.ratios)} ratios x {len(args.strategies)} strategies)", file=sys.stderr)
    try:
        table = run_sweep(project, plan, workers=_workers(args, plan[0].params), stage_timeout=args.stage_timeout, gpus=_gpus(args.gpus),
                          out=Path(args.out) if args.out else None, wait=args.wait)
    except Exception as err:  # a stage failed in one run of the sweep
        from .curation import StageFailed

        if isinstance(err, StageFailed):
            raise StageError.of(err) from None
        raise
    print(table.markdown)
    print(f"semiprune: table written to {table.parquet} and {table.path}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .bench import plan_bench, read_suite, run_bench

    project = _project(args.project)
    suite = read_suite(Path(args.suite))
    grid = {k: getattr(args, k) if getattr(args, k) is not None else suite.get(k, []) for k in ("methods", "ratios", "seeds", "variants")}
    cells = plan_bench(project, profile=args.profile or suite.get("profile"), overrides=[*suite.get("set", []), *args.set],
                       **grid)
    out = Path(args.out) if args.out else project / "reports" / "bench" / Path(args.suite).stem
    print(f"semiprune: bench of {len(cells)} runs into {out}", file=sys.stderr)
    try:
        path = run_bench(project, cells, out, workers=_workers(args, cells[0].params), stage_timeout=args.stage_timeout,
                         gpus=_gpus(args.gpus), wait=args.wait)
    except Exception as err:
        from .curation import StageFailed

        if isinstance(err, StageFailed):
            raise StageError.of(err) from None
        raise
    print(path.read_text())
    return 0


def cmd_serve(args) -> int:
    from .curation import curation, task_runner

    cron = validate_cron(args.cron)
    project, ws = _prepared(args)
    name = args.deployment or f"semiprune-{ws.name}"
    workers = _workers(args, yaml.safe_load((ws / "params.yaml").read_text()))
    flow_ = curation.with_options(task_runner=task_runner(args.dask_address, args.dask_workers))
    print(f"semiprune: serving deployment {name!r} on schedule {cron!r}; Ctrl-C stops it", file=sys.stderr)
    flow_.serve(name=name, cron=cron, parameters={"workspace": str(ws), "project": str(project),
                                                  "stage_timeout": args.stage_timeout, "gpus": _gpus(args.gpus),
                                                  "model_workers": workers})
    return 0


def validate_cron(expr: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=expr)
    except ValidationError:
        raise ConfigError(f"cron expression {expr!r} does not parse",
                          'give five fields: minute hour day-of-month month day-of-week, e.g. "0 3 * * *"') from None
    return expr


def cmd_server_start(args) -> int:
    state, new = prefect_server.start(port=args.port)
    print(f"semiprune: Prefect server {'started' if new else 'already running'} at {state['url']} (PID {state['pid']}, "
          f"log {state['log']}); semiprune commands use it while it runs; `semiprune server stop` ends it", file=sys.stderr)
    print(state["url"])
    return 0


def cmd_server_stop(args) -> int:
    state = prefect_server.stop()
    print(f"semiprune: Prefect server at {state['url']} stopped" if state else "semiprune: no Prefect server was running",
          file=sys.stderr)
    return 0


def cmd_server_status(args) -> int:
    state = prefect_server.running()
    if state is None:
        print("semiprune: no Prefect server running (each run starts a temporary one; `semiprune server start` keeps one)",
              file=sys.stderr)
        return 1
    print(f"{state['url']}\tPID {state['pid']}\tsince {state['started']}\tlog {state['log']}")
    return 0


def _use_prefect_server() -> None:
    """Before a command runs a flow: report to the running `semiprune server`, or say what happens instead."""
    if prefect_server.use_running_server():
        return
    if not os.environ.get("PREFECT_API_URL"):
        print("semiprune: no Prefect server running; this run starts a temporary one (about 5 s; "
              "`semiprune server start` keeps one for every run)", file=sys.stderr)


def cmd_remote(args) -> int:
    name, url = team_cache.add_remote(_project(args.project), args.url, name=args.remote_name, local=args.local)
    print(f"semiprune: remote {name!r} -> {url} is the default for push and run --pull", file=sys.stderr)
    return 0


def cmd_remote_show(args) -> int:
    name, url = team_cache.default_remote(_project(args.project))
    print(f"{name}\t{url}")
    return 0


def cmd_push(args) -> int:
    project, ws = _prepared(args)
    team_cache.push(project, ws)
    return 0


def cmd_pull(args) -> int:
    project, ws = _prepared(args)
    team_cache.pull(project, ws)
    return 0


def _existing(args) -> tuple[Path, Path]:
    """(project, workspace) of a finished or running run, never creating one (read-only commands)."""
    project = _project(args.project)
    if not args.profile and not args.set and not args.name:
        return project, project
    name = args.name or workspace.workspace_name(args.profile, args.set)
    ws = project / workspace.RUNS / name
    if not ws.is_dir():
        runs = sorted(p.name for p in (project / workspace.RUNS).glob("*") if p.is_dir()) if (project / workspace.RUNS).is_dir() else []
        raise ConfigError(f"no run {name!r} under {workspace.RUNS}/", f"run it first, or name one of: {', '.join(runs) or 'none yet'}")
    return project, ws


def cmd_explain(args) -> int:
    from .audit_commands import explain_sample

    facts = explain_sample(_existing(args)[1], args.sample_id)
    if args.json:
        print(json.dumps({k: v for k, v in facts.items() if k != "lines"}, indent=2, default=str))
    else:
        print("\n".join(facts["lines"]))
    return 0


def cmd_export(args) -> int:
    from .audit_commands import export_samples

    out = Path(args.output) if args.output else None
    n = export_samples(_existing(args)[1], pruned=args.pruned, paths=args.paths, out=out)
    if out:
        print(f"semiprune: {n} {'pruned' if args.pruned else 'kept'} samples written to {out}", file=sys.stderr)
    return 0


def cmd_diff(args) -> int:
    from .audit_commands import diff_results, format_diff

    result = diff_results(_project(args.project), args.a, args.b)
    print(json.dumps(result, indent=2) if args.json else format_diff(result))
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    project, ws = _existing(args)
    path = build_report(ws, project)
    print(f"semiprune: report written to {path}", file=sys.stderr)
    return 0


def cmd_params(args) -> int:
    if args.materialize:
        _, _, params = _where(args)
    else:
        params = workspace.effective_params(_project(args.project), profile=args.profile, overrides=args.set)
    sys.stdout.write(yaml.safe_dump(params, sort_keys=False))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiprune", description="Label-efficient dataset pruning.")
    parser.add_argument("--version", action="version", version=f"semiprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_params(p):
        p.add_argument("--profile", help="merge profiles/NAME.yaml onto params.yaml (e.g. smoke)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one param, e.g. --set data.labeled.per_class=40 (repeatable)")
        p.add_argument("--name", help="workspace name under runs/ for a run with --profile/--set")
        p.add_argument("--project", help="project folder (default: found from the current folder)")
        return p

    def orchestrated(p):
        p.add_argument("--workers", type=int, default=None,
                       help="model stages at a time, e.g. the folds (default: one per GPU; on CPU, as many as base.threads fit the cores); stages without a model run beside them")
        p.add_argument("--stage-timeout", type=float, default=None, metavar="SECONDS",
                       help="kill a stage that runs longer (default: no limit)")
        p.add_argument("--gpus", default="auto",
                       help="GPUs for model stages, e.g. 0,1; 'none'; default 'auto' (CUDA_VISIBLE_DEVICES or nvidia-smi)")
        p.add_argument("--wait", action="store_true",
                       help="if another run holds the workspace, start when it ends (default: exit 75 at once)")
        dask = p.add_mutually_exclusive_group()
        dask.add_argument("--dask-address", help="run the stages on this Dask scheduler (tcp://host:8786)")
        dask.add_argument("--dask-workers", type=int, help="run the stages on a local Dask cluster of N workers")
        p.set_defaults(runs_flows=True)
        return p

    run = orchestrated(with_params(sub.add_parser("run", help="run the pipeline as a Prefect flow (DVC re-runs only what is stale)")))
    run.add_argument("--force", action="store_true", help="re-run every stage even if cached")
    run.add_argument("--pull", action="store_true", help="take each stage from the team remote's cache when it has it")
    run.add_argument("--push", action="store_true", help="push outputs and run-cache to the team remote afterwards")
    run.add_argument("stages", nargs="*", help="run only up to these stages (default: all)")
    run.set_defaults(func=cmd_run)
    status = with_params(sub.add_parser("status", help="show which stages are stale and why"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    sweep = orchestrated(with_params(sub.add_parser(
        "sweep", help="select + evaluate for several ratios and strategies on the cached dynamics; one table")))
    sweep.add_argument("--ratios", type=float, nargs="+", required=True, help="pruning ratios, e.g. 0.3 0.5 0.7")
    sweep.add_argument("--strategies", nargs="+", required=True,
                       help="strategies, each optionally with its score: random aum_cutoff dual_beta:oos_dual")
    sweep.add_argument("--out", help="folder for sweep.parquet and sweep.md (default reports/sweep)")
    sweep.set_defaults(func=cmd_sweep)
    bench = orchestrated(with_params(sub.add_parser("bench", help="methods x ratios x seeds x variants from a suite file")))
    bench.add_argument("suite", help="a suite YAML, e.g. benchmarks/suites/fmnist.yaml")
    bench.add_argument("--methods", nargs="+", help="override the suite's methods")
    bench.add_argument("--ratios", nargs="+", type=float, help="override the suite's pruning ratios")
    bench.add_argument("--seeds", nargs="+", type=int, help="override the suite's seeds")
    bench.add_argument("--variants", nargs="+", help="override the suite's variants (standard, long_tailed, corrupted, labels:N)")
    bench.add_argument("--out", help="results folder (default reports/bench/<suite name>)")
    bench.set_defaults(func=cmd_bench)
    serve = orchestrated(with_params(sub.add_parser("serve", help="serve the flow as a Prefect deployment on a cron schedule")))
    serve.add_argument("--cron", required=True, help='schedule, e.g. "0 3 * * *" (03:00 every day)')
    serve.add_argument("--deployment", help="deployment name (default semiprune-<workspace>)")
    serve.set_defaults(func=cmd_serve)
    server = sub.add_parser("server", help="a local Prefect server in the background that every run reports to")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    server_start = server_sub.add_parser("start", help="start it (if none runs) and print its API URL")
    server_start.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    server_start.set_defaults(func=cmd_server_start)
    server_sub.add_parser("stop", help="stop it").set_defaults(func=cmd_server_stop)
    server_sub.add_parser("status", help="its URL and PID; exit 1 when none runs").set_defaults(func=cmd_server_status)
    remote = sub.add_parser("remote", help="the team's shared DVC remote (a directory, or s3://... with dvc[s3])")
    remote_sub = remote.add_subparsers(dest="remote_command", required=True)
    add = remote_sub.add_parser("add", help="make URL the default remote")
    add.add_argument("url", help="a shared directory (default kind) or any DVC remote URL")
    add.add_argument("--remote-name", default="team", help="DVC remote name (default team)")
    add.add_argument("--local", action="store_true", help="only for this clone (.dvc/config.local), not committed")
    add.add_argument("--project", help="project folder (default: found from the current folder)")
    add.set_defaults(func=cmd_remote)
    show = remote_sub.add_parser("show", help="print the default remote")
    show.add_argument("--project", help="project folder (default: found from the current folder)")
    show.set_defaults(func=cmd_remote_show)
    push = with_params(sub.add_parser("push", help="push outputs and DVC's run-cache to the team remote"))
    push.set_defaults(func=cmd_push)
    pull = with_params(sub.add_parser("pull", help="pull the outputs dvc.lock records (and the run-cache) from the team remote"))
    pull.set_defaults(func=cmd_pull)
    explain = with_params(sub.add_parser("explain", help="why one sample was kept or pruned"))
    explain.add_argument("sample_id", help="e.g. train/000123 (see `semiprune export`)")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.set_defaults(func=cmd_explain)
    export = with_params(sub.add_parser("export", help="the kept (or pruned) samples as ids or file paths"))
    export.add_argument("--pruned", action="store_true", help="the pruned samples instead of the kept ones")
    export.add_argument("--paths", action="store_true", help="file paths instead of ids (folder datasets)")
    export.add_argument("-o", "--output", help="FILE.txt, FILE.csv or FILE.parquet (default: ids on stdout)")
    export.set_defaults(func=cmd_export)
    report = with_params(sub.add_parser("report", help="write reports/report.html (the flow also does, after each run)"))
    report.set_defaults(func=cmd_report)
    diff = sub.add_parser("diff", help="which samples changed status between two runs or revisions, and why")
    diff.add_argument("a", help="'.', a run under runs/, or a git revision")
    diff.add_argument("b", help="the same kinds")
    diff.add_argument("--json", action="store_true", help="machine-readable output")
    diff.add_argument("--project", help="project folder (default: found from the current folder)")
    diff.set_defaults(func=cmd_diff)
    params = with_params(sub.add_parser("params", help="print the effective params (params.yaml + profile + --set)"))
    params.add_argument("--materialize", action="store_true", help="also create the run workspace")
    params.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE") and argv is None:  # `semiprune export | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "runs_flows", False):
            _use_prefect_server()
        return args.func(args)
    except SemiPruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except subprocess.CalledProcessError as err:
        print(f"error: {' '.join(err.cmd)} failed with exit code {err.returncode}: {err.stderr or ''}".rstrip(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
