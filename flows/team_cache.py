"""A team's shared artifact cache: a DVC remote that holds outputs and DVC's run-cache.

A shared directory is the default kind (``semiprune remote add /mnt/team/semiprune-cache``); any
URL DVC supports works with its extra installed (``pip install "dvc[s3]"`` for ``s3://...``).
``semiprune run --push`` (or ``semiprune push``) uploads the outputs and the run-cache entries;
``semiprune run --pull`` lets every stage take a run with the same code, params and inputs from
the remote instead of running it, so a second clone gets the results without training.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from semiprune_core.errors import ConfigError, SemiPruneError

from .workspace import dvc


class RemoteError(SemiPruneError):
    """A transfer to or from the remote failed (network, permissions, missing files)."""

    exit_code = 1


def is_directory(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser()


def default_remote(project: Path) -> tuple[str, str]:
    """(name, url) of the project's default DVC remote; a clear error when there is none."""
    from dvc.config import Config

    config = Config(dvc_dir=str(project / ".dvc"))
    name = config["core"].get("remote")
    if not name or name not in config["remote"]:
        raise ConfigError("no team remote is configured",
                          "run `semiprune remote add /path/to/shared/dir` (or any DVC remote URL) first")
    url = config["remote"][name]["url"]
    if is_directory(url) and not os.path.isabs(_local_path(url)):  # DVC stores it relative to .dvc/
        url = str((project / ".dvc" / _local_path(url)).resolve())
    return name, url


def check_reachable(name: str, url: str, *, write: bool = False) -> None:
    """A directory remote must exist (and be writable to push); other kinds are DVC's to check."""
    if not is_directory(url):
        return
    path = _local_path(url)
    if not path.is_dir():
        raise ConfigError(f"team remote {name!r} at {path} is unreachable: no such directory",
                          "mount or create it, or set another with `semiprune remote add DIR`")
    if write and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"team remote {name!r} at {path} is not writable", "fix its permissions, or push from an account that may write there")


def add_remote(project: Path, url: str, *, name: str = "team", local: bool = False) -> tuple[str, str]:
    """Make ``url`` the project's default remote (in .dvc/config, shared through git, unless ``local``)."""
    if is_directory(url):
        path = _local_path(url).resolve()
        check_reachable(name, str(path))
        url = str(path)
    scope = ["--local"] if local else []
    dvc(["remote", "add", "--force", "--default", *scope, name, url], cwd=project, project=project, capture=True)
    _verify_downloads(project, project, name, scope)
    return name, url


def _verify_downloads(project: Path, repo: Path, name: str, scope: list[str] = ()) -> None:
    """Hash every object DVC downloads from the remote and refuse one whose content does not match
    its name: a shared cache is only as trustworthy as its least careful writer."""
    dvc(["remote", "modify", *scope, name, "verify", "true"], cwd=repo, project=project, capture=True)


def prepare(project: Path, ws: Path, *, write: bool = False) -> tuple[str, str]:
    """The project's default remote, reachable, and configured in workspace ``ws`` too."""
    name, url = default_remote(project)
    check_reachable(name, url, write=write)
    if ws != project:  # a run workspace is its own DVC repository
        dvc(["remote", "add", "--force", "--default", name, url], cwd=ws, project=project, capture=True)
        _verify_downloads(project, ws, name)
    return name, url


def _transfer(project: Path, ws: Path, verb: str, name: str) -> None:
    proc = dvc([verb, "--run-cache", "--remote", name], cwd=ws, project=project, check=False, capture=True)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0:
        problem = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "no output")
        raise RemoteError(f"dvc {verb} to/from remote {name!r} failed: {problem.removeprefix('ERROR: ')}",
                          "check the remote's URL, credentials and free space, then retry")
    print(f"semiprune: {verb} {name!r}: {lines[-1] if lines else 'done'}", file=sys.stderr)


def push(project: Path, ws: Path) -> None:
    """Upload ``ws``'s outputs (as dvc.lock records them) and the run-cache to the default remote."""
    name, _ = prepare(project, ws, write=True)
    if not (ws / "dvc.lock").exists():
        raise ConfigError(f"nothing to push: {ws} has not run yet (no dvc.lock)", "run `semiprune run` first")
    _transfer(project, ws, "push", name)


def pull(project: Path, ws: Path) -> None:
    """Download the outputs ``ws``'s dvc.lock records, and the run-cache, from the default remote."""
    name, _ = prepare(project, ws)
    if not (ws / "dvc.lock").exists():
        raise ConfigError(f"nothing recorded to pull: {ws} has no dvc.lock",
                          "run `semiprune run --pull`: each stage comes from the team cache when it is there")
    _transfer(project, ws, "pull", name)

