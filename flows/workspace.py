"""Where a run happens, and with which params.

A plain ``semiprune run`` runs in the project itself with its ``params.yaml``. A run with a profile or
``--set`` overrides never rewrites that file: it runs in its own workspace ``runs/<name>/``, a DVC
repository whose ``params.yaml`` is the merged result and whose other top-level entries (code, data)
are links back to the project. Every workspace shares the project's DVC cache, run-cache included,
so a stage whose code, deps and params match a run anywhere in the project is restored, not re-run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from semiprune_core.config import apply_overrides, merge, read_yaml, validate
from semiprune_core.errors import ConfigError, WorkspaceBusy
from semiprune_core.io import atomic_path

from .pids import pid_alive

PROFILES = "profiles"
RUNS = "runs"
# Top-level entries a run workspace owns itself instead of linking to the project's.
OWN = {".git", ".dvc", ".dvcignore", "dvc.yaml", "dvc.lock", "params.yaml", RUNS, "artifacts", "metrics",
       "plots", "reports", ".semiprune", ".venv", ".pytest_cache", ".hypothesis"}


def list_profiles(project: Path) -> list[str]:
    return sorted(p.stem for p in (project / PROFILES).glob("*.yaml"))


def effective_params(project: Path, *, profile: str | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """params.yaml, then the profile, then each ``key=value``; validated before anything runs."""
    raw = read_yaml(project / "params.yaml")
    if profile:
        path = project / PROFILES / f"{profile}.yaml"
        if not path.exists():
            known = ", ".join(list_profiles(project)) or "none"
            raise ConfigError(f"unknown profile {profile!r}", f"choose one of: {known} (files in {PROFILES}/)")
        raw = merge(raw, read_yaml(path))
    raw = apply_overrides(raw, list(overrides))
    validate(raw, source="params" + (f" (profile {profile})" if profile else "") + (" with --set" if overrides else ""))
    return raw


def workspace_name(profile: str | None, overrides: list[str]) -> str:
    if not overrides:
        return profile or "default"
    digest = hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:8]
    return f"{profile or 'set'}-{digest}"


def dvc_env(project: Path) -> dict[str, str]:
    """Environment for DVC and the stages it runs: this interpreter's ``python`` first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DVC_SITE_CACHE_DIR", str(project / ".semiprune" / "dvc-site"))
    return env


def dvc(args: list[str], *, cwd: Path, project: Path, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=dvc_env(project),
                          text=True, capture_output=capture)
    if check and proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-1:] if capture else []
        raise subprocess.CalledProcessError(proc.returncode, ["dvc", *args], output=proc.stdout, stderr="\n".join(detail))
    return proc


def clear_stale_dvc_locks(ws: Path) -> list[int]:
    """Drop the entries of DVC's rwlock whose process is gone; return their PIDs.

    DVC records the outputs a running ``repro`` reads and writes in ``.dvc/tmp/rwlock`` and does not
    clean up after a killed process, so the next run would refuse to start ("... is busy"). Entries of
    live processes stay: a concurrent run still blocks, as DVC intends.
    """
    path = ws / ".dvc" / "tmp" / "rwlock"
    try:
        lock = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    dead: set[int] = set()
    for mode in ("read", "write"):
        entries = lock.get(mode, {})
        for out, info in list(entries.items()):
            infos = info if isinstance(info, list) else [info]
            live = [i for i in infos if pid_alive(int(i.get("pid", 0)))]
            dead |= {int(i.get("pid", 0)) for i in infos if i not in live}
            if not live:
                del entries[out]
            elif isinstance(info, list):
                entries[out] = live
    if dead:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(lock))
    return sorted(dead)


_HELD: set[Path] = set()  # workspaces this process holds, so the flow inside a CLI run re-enters


@contextlib.contextmanager
def run_lock(ws: Path, *, wait: bool = False):
    """One run per workspace: a second fails with :class:`WorkspaceBusy`, or with ``wait`` queues.

    DVC locks a repository per process, but a run is many DVC processes (one per stage), so two
    runs could interleave stages. The lock is an ``flock`` on ``.semiprune/run.lock``: the kernel
    drops it when its holder dies, however it dies, so a killed run never blocks the next.
    """
    key = ws.resolve()
    if key in _HELD:
        yield
        return
    path = ws / ".semiprune" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "a process that is starting"
            if not wait:
                raise WorkspaceBusy(f"workspace {ws} is in use by another semiprune run ({holder})",
                                    "wait for it to end, or pass --wait to start when it does") from None
            print(f"semiprune: waiting for the run holding {ws} ({holder})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        os.close(fd)  # releases the flock


def ensure_workspace(project: Path, name: str, params: dict[str, Any]) -> Path:
    """Create or refresh ``runs/<name>`` with ``params`` as its params.yaml."""
    ws = project / RUNS / name
    ws.mkdir(parents=True, exist_ok=True)
    for entry in project.iterdir():
        if entry.name in OWN:
            continue
        link = ws / entry.name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(os.path.relpath(entry, ws))
    for stale in ws.iterdir():  # links to entries the project no longer has
        if stale.is_symlink() and not stale.exists():
            stale.unlink()
    shutil.copyfile(project / "dvc.yaml", ws / "dvc.yaml")
    with atomic_path(ws / "params.yaml") as tmp:
        header = f"# Generated by `semiprune run` for workspace {name!r}; edit the project's params.yaml or profiles/ instead.\n"
        tmp.write_text(header + yaml.safe_dump(params, sort_keys=False))
    if not (ws / ".dvc").exists():
        dvc(["init", "--no-scm", "-q"], cwd=ws, project=project)
    cache = project / ".dvc" / "cache"
    if _cache_dir(ws) != cache.resolve():
        # `dvc config` resolves a relative path from the working directory (and stores it relative
        # to .dvc/config), so the path handed over is relative to the workspace itself
        dvc(["config", "cache.dir", os.path.relpath(cache, ws)], cwd=ws, project=project)
    return ws


def _cache_dir(ws: Path) -> Path | None:
    """The cache folder ``ws``'s .dvc/config names (relative paths are relative to .dvc/)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ws / ".dvc" / "config")
    value = config.get("cache", "dir", fallback=None)
    return (ws / ".dvc" / value).resolve() if value else None
