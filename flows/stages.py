"""The pipeline's stages as DVC defines them, and one stage run as a subprocess.

The stage graph is read from DVC (``dvc.yaml`` through DVC's own index), never from a hand-kept
list: a stage added to ``dvc.yaml`` is orchestrated without touching this module. A stage runs as
``dvc --wait-for-lock repro --single-item NAME``, so DVC alone decides whether it executes, is
restored from the run-cache, or is already up to date; this module only reports which.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from semiprune_core.errors import ConfigError

#: How DVC reports each outcome of ``repro --single-item``.
_OUTCOMES = (("ran", "Running stage '{}'"), ("restored", "Stage '{}' is cached - skipping run"),
             ("unchanged", "Stage '{}' didn't change, skipping"))
BAD_INPUT_EXIT = 2  # a stage's "bad input or config" exit code (tasks/_stage.py): retrying cannot help
#: ``dvc --wait-for-lock``, trying the lock every 50 ms (``flows/dvc_cli.py``)
DVC_WAITING = (sys.executable, "-m", "flows.dvc_cli", "--wait-for-lock")


@dataclass(frozen=True)
class Stage:
    """A DVC stage (``score@0`` for a foreach item) and the stages whose outputs it reads.

    ``always_changed`` stages run on every repro; ``gpu`` marks a stage that trains or runs a model
    (``meta: {gpu: true}`` in dvc.yaml), so it gets a device of its own when there are GPUs.
    """

    name: str
    upstream: tuple[str, ...]
    always_changed: bool = False
    gpu: bool = False


GRAPH_CACHE = Path(".semiprune/stage_graph.json")


def stage_graph(workspace: Path) -> list[Stage]:
    """The stages of ``workspace``'s dvc.yaml in an order where every stage follows its upstream.

    DVC builds the graph (about a second: it imports itself and indexes the repository); the result
    is kept in ``.semiprune/stage_graph.json`` under a digest of dvc.yaml and the params it
    interpolates (the inputs of its foreach items), so a run whose pipeline did not change reads it
    back instead.
    """
    if not (workspace / ".dvc").is_dir():  # not a parent's repository either: this folder must be one
        raise ConfigError(f"{workspace} is not a DVC repository", "run from the project root (or `dvc init` there)")
    _check_lockfile(workspace / "dvc.lock")
    key = _graph_key(workspace)
    cache = workspace / GRAPH_CACHE
    if key is not None and cache.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            saved = json.loads(cache.read_text())
            if saved["key"] == key:
                return [Stage(s["name"], tuple(s["upstream"]), s["always_changed"], s["gpu"]) for s in saved["stages"]]
    stages = _dvc_stage_graph(workspace)
    if key is not None:
        from semiprune_core.io import atomic_path

        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps({"key": key, "stages": [asdict(s) for s in stages]}))
    return stages


def _check_lockfile(lock: Path) -> None:
    """One error for a dvc.lock that is empty or no YAML mapping, where DVC would fail every stage
    with "required key not provided, in schema". A plain ``dvc`` killed while writing it leaves it
    so (the flow's own DVC processes replace it whole: ``flows/dvc_cli.py``), as does a merge left
    unresolved."""
    import yaml

    try:
        data = yaml.load(lock.read_bytes(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        return
    except (OSError, yaml.YAMLError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
        raise ConfigError(f"{lock} is empty or damaged (a DVC process killed while writing it, or an unresolved merge)",
                          f"move it aside (mv {lock} {lock}.damaged) and run again: DVC restores every stage its "
                          "run-cache holds instead of running it")


def _graph_key(workspace: Path) -> str | None:
    """A digest of what the graph is made of: dvc.yaml and the params it interpolates (``${cv.folds}``
    makes the folds), so changing any other param (the pruning ratio) keeps the graph. None when
    dvc.yaml reads other files (``vars``) or params.yaml cannot be read."""
    import hashlib
    import re
    from importlib.metadata import version

    import yaml

    try:
        dvc_yaml = (workspace / "dvc.yaml").read_bytes()
        text = (workspace / "params.yaml").read_text() if (workspace / "params.yaml").exists() else ""
        params = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if b"vars:" in dvc_yaml or not isinstance(params, dict):
        return None
    used = {}
    for ref in sorted(set(re.findall(r"\$\{\s*([^}\s]+)\s*\}", dvc_yaml.decode(errors="replace")))):
        value = params
        for part in ref.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        used[ref] = value
    return hashlib.sha256(b"\0".join([version("dvc").encode(), dvc_yaml,
                                       json.dumps(used, sort_keys=True, default=str).encode()])).hexdigest()


def _dvc_stage_graph(workspace: Path) -> list[Stage]:
    import networkx as nx
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(workspace))
    except NotDvcRepoError:
        raise ConfigError(f"{workspace} is not a DVC repository", "run from the project root (or `dvc init` there)") from None
    try:
        graph = repo.index.graph  # edges run from a stage to the stages it depends on
        order = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=lambda s: s.name)
        return [Stage(s.name, tuple(sorted(u.name for u in graph.successors(s))), bool(s.always_changed),
                      bool((s.meta or {}).get("gpu"))) for s in order]
    except DvcException as err:
        raise ConfigError(f"DVC cannot read the pipeline in {workspace}: {err}", "fix dvc.yaml") from None
    finally:
        repo.close()


@dataclass(frozen=True)
class StageRun:
    """What one ``repro --single-item`` did: outcome is ran / restored / unchanged / failed / timed out."""

    name: str
    outcome: str
    returncode: int
    seconds: float
    tail: tuple[str, ...]  # the last lines of its output, for error reports

    @property
    def bad_input(self) -> bool:
        """The stage refused its input (exit 2): a retry would fail the same way."""
        return self.outcome == "failed" and f"exited with {BAD_INPUT_EXIT}" in "\n".join(self.tail)


def outcome_of(name: str, lines: list[str] | tuple[str, ...]) -> str:
    """Which outcome DVC reported for stage ``name`` in its output (``unknown`` if none)."""
    text = "\n".join(lines)
    for outcome, pattern in _OUTCOMES:
        if pattern.format(name) in text:
            return outcome
    return "unknown"


def upstream_closure(stages: list[Stage], names: list[str]) -> list[Stage]:
    """``stages`` reduced to ``names`` and every stage they depend on, in the same order."""
    by_name = {s.name: s for s in stages}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"unknown stage {', '.join(unknown)}", f"choose from: {', '.join(by_name)}")
    keep, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(by_name[name].upstream)
    return [s for s in stages if s.name in keep]


def run_stages(workspace: Path, stages: list[str] | None = None) -> list[Stage]:
    """The stages a run covers, in graph order: all, or ``stages`` and their upstream."""
    graph = stage_graph(workspace)
    return upstream_closure(graph, list(stages)) if stages else graph


def stale_stages(workspace: Path, *, env: dict[str, str] | None = None) -> dict[str, list[str]]:
    """The stages ``dvc status`` finds changed, each with why, in words.

    A stage missing here is up to date *now*; it becomes stale if a stage upstream of it produces
    different outputs when it runs, so callers treat the downstream of a stale stage as stale too.
    """
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=workspace, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"dvc status failed in {workspace}: {last}", "fix the DVC repository (run `dvc status` there)")
    return {name: _reasons(entries) for name, entries in json.loads(proc.stdout or "{}").items()}


def _reasons(entries: list) -> list[str]:
    words = {"always changed": "always runs", "changed command": "its command changed",
             "changed checksum": "dvc.lock was edited"}
    reasons = []
    for entry in entries:
        if isinstance(entry, str):
            reasons.append(words.get(entry, entry))
            continue
        for kind, changes in entry.items():
            what = "output" if "outs" in kind else "dependency"
            for path, change in changes.items():
                if isinstance(change, dict):  # a params file: which keys
                    reasons.append(f"params {', '.join(f'{k} {v}' for k, v in change.items())}")
                else:
                    reasons.append(f"{what} {path} {change}")
    return sorted(reasons, key=lambda r: not r.startswith("params"))  # the usual cause first (stable sort)


def stale_downstream(stages: list[Stage], stale: set[str]) -> set[str]:
    """``stale`` and every stage downstream of it: the stages DVC must look at again."""
    out = set(stale)
    for stage in stages:  # graph order: upstream first
        if any(u in out for u in stage.upstream):
            out.add(stage.name)
    return out


def run_stage(workspace: Path, name: str, *, env: dict[str, str] | None = None, timeout: float | None = None,
              force: bool = False, pull: bool = False, on_line: Callable[[str], None] = lambda line: None,
              keep: int = 40) -> StageRun:
    """Run one stage through DVC in a subprocess, passing each output line to ``on_line``.

    Past ``timeout`` seconds the process tree (DVC and the stage it runs) is killed and the
    outcome is ``timed out``. ``pull``: DVC takes the stage from the default remote's run-cache
    (outputs included) when a run with the same inputs is there. DVC's lock wait lets fold stages
    run side by side (``flows/dvc_cli.py`` makes it try every 50 ms). DVC deletes a stage's outputs
    before running it; if the stage fails, the outputs of its last good run (recorded in dvc.lock
    and kept in the cache) are put back, so a failure loses nothing.
    """
    cmd = [*DVC_WAITING, "repro", "--single-item", name] + (["--force"] if force else []) + (["--pull"] if pull else [])
    started = time.monotonic()
    reported = "unknown"

    def watch(line: str) -> None:
        nonlocal reported
        if reported == "unknown":
            reported = outcome_of(name, [line])
        on_line(line)

    rc, tail, timed_out = _stream(_popen(cmd, workspace, env), timeout=timeout, on_line=watch, keep=keep)
    if timed_out:
        outcome = "timed out"
    elif rc != 0:
        outcome = "failed"
    else:
        outcome = reported
    if outcome in ("failed", "timed out"):
        subprocess.run([*DVC_WAITING, "checkout", "--quiet", name], cwd=workspace,
                       env=env, capture_output=True)  # fails harmlessly when the stage never succeeded
    return StageRun(name, outcome, rc, round(time.monotonic() - started, 2), tail)


def start_cache_pass(workspace: Path, names: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the cache pass over ``names`` (graph order; ``flows/reuse.py``); ``reuse_cached`` reads
    its answer. Started early, it runs while Prefect loads (about 1.5 s on two cores)."""
    return _popen([sys.executable, "-m", "flows.reuse", *names], workspace, env)


def reuse_cached(workspace: Path, names: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
                 on_line: Callable[[str], None] = lambda line: None, started: subprocess.Popen | None = None) -> dict[str, dict]:
    """Run the always-run stages of ``names`` and keep or restore from the run-cache every stage that
    needs no training, all in one DVC process: {stage: {outcome, seconds}}. ``started``: that
    process, already started by ``start_cache_pass`` with the same names.

    The stages missing from the answer are left to their own ``run_stage``: those with no cached
    run, those downstream of them, and any that failed here. If the pass itself fails, the answer
    is empty and every stage goes the per-stage way, which is slower but decides the same.
    """
    from .reuse import MARK

    answer: list[dict] = []

    def watch(line: str) -> None:
        if line.startswith(MARK):
            answer.extend(json.loads(line.removeprefix(MARK)))
        else:
            on_line(line)

    proc = started or start_cache_pass(workspace, names, env=env)
    rc, _, timed_out = _stream(proc, timeout=timeout, on_line=watch)
    if rc != 0 or timed_out:
        on_line(f"the cache pass {'timed out' if timed_out else f'exited with {rc}'}: every stage goes through its own task")
        return {}
    return {r["name"]: {"outcome": r["outcome"], "seconds": r["seconds"]} for r in answer}


@contextlib.contextmanager
def stage_server(workspace: Path, env: dict[str, str]) -> Iterator[str | None]:
    """A warm-start server for the stages that run while this is open (``tasks/_warm_start.py``):
    yields its socket, for ``SEMIPRUNE_STAGE_SERVER`` in the stages' environment, or None where
    warm starts are turned off (``SEMIPRUNE_WARM_STAGES=0``). The server needs about a second to
    import torch; a stage that starts before then starts cold."""
    if env.get("SEMIPRUNE_WARM_STAGES", "1") == "0" or not sys.platform.startswith("linux"):
        yield None
        return
    folder = tempfile.mkdtemp(prefix="semiprune-stages-")  # private (0700): only this user can connect
    path = os.path.join(folder, "server.sock")
    server = subprocess.Popen([sys.executable, "-m", "tasks._warm_start", path], cwd=workspace, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # Ctrl-C reaches the stages through their clients only
    try:
        yield path
    finally:
        server.terminate()  # stages it started run on: they are processes of their own
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _popen(cmd: list[str], workspace: Path, env: dict[str, str] | None) -> subprocess.Popen:
    # same process group as the caller: killing a run (its group) kills its stages too
    return subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)


def _stream(proc: subprocess.Popen, *, timeout: float | None, on_line: Callable[[str], None],
            keep: int = 40) -> tuple[int, tuple[str, ...], bool]:
    """Each output line of ``proc`` to ``on_line`` until it ends: (exit code, last ``keep`` lines,
    whether it was killed past ``timeout`` seconds with its whole process tree)."""
    timed_out = threading.Event()

    def kill() -> None:  # DVC and the stage command it started
        import psutil

        timed_out.set()
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(proc.pid)
            for p in [*tree.children(recursive=True), tree]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    tail: deque[str] = deque(maxlen=keep)
    try:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            on_line(line)
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
    return rc, tuple(tail), timed_out.is_set()
