"""The ``semiprune`` command."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from semiprune_core import __version__
from semiprune_core.errors import SemiPruneError

from . import workspace


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


def cmd_run(args) -> int:
    project, ws, _ = _where(args)
    if ws != project:
        print(f"semiprune: running in workspace {ws.relative_to(project)} (params.yaml there is the merged result)", file=sys.stderr)
    stale = workspace.clear_stale_dvc_locks(ws)
    if stale:
        print(f"semiprune: cleared DVC locks left by killed run(s) (PID {', '.join(map(str, stale))})", file=sys.stderr)
    repro = ["repro"] + (["--force"] if args.force else []) + (args.stages or [])
    rc = workspace.dvc(repro, cwd=ws, project=project, check=False).returncode
    if rc == 0:
        print(f"semiprune: done; outputs under {ws / 'artifacts'}, metrics under {ws / 'metrics'}", file=sys.stderr)
    elif workspace.dvc(["checkout", "--quiet"], cwd=ws, project=project, check=False, capture=True).returncode == 0:
        # DVC deletes a stage's outputs before running it; put back those of the last good run (dvc.lock)
        print("semiprune: the failed stage's previous outputs are restored", file=sys.stderr)
    return rc


def cmd_status(args) -> int:
    project, ws, _ = _where(args)
    return workspace.dvc(["status"], cwd=ws, project=project, check=False).returncode


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

    run = with_params(sub.add_parser("run", help="run the pipeline (DVC re-runs only what is stale)"))
    run.add_argument("--force", action="store_true", help="re-run every stage even if cached")
    run.add_argument("stages", nargs="*", help="run only up to these stages (default: all)")
    run.set_defaults(func=cmd_run)
    status = with_params(sub.add_parser("status", help="show which stages are stale"))
    status.set_defaults(func=cmd_status)
    params = with_params(sub.add_parser("params", help="print the effective params (params.yaml + profile + --set)"))
    params.add_argument("--materialize", action="store_true", help="also create the run workspace")
    params.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except SemiPruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except subprocess.CalledProcessError as err:
        print(f"error: {' '.join(err.cmd)} failed with exit code {err.returncode}: {err.stderr or ''}".rstrip(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
