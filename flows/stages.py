"""The pipeline's stages as DVC defines them, and one stage run as a subprocess.

The stage graph is read from DVC (``dvc.yaml`` through DVC's own index), never from a hand-kept
list: a stage added to ``dvc.yaml`` is orchestrated without touching this module. A stage runs as
``dvc --wait-for-lock repro --single-item NAME``, so DVC alone decides whether it executes, is
restored from the run-cache, or is already up to date; this module only reports which.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from semiprune_core.errors import ConfigError

#: How DVC reports each outcome of ``repro --single-item``.
_OUTCOMES = (("ran", "Running stage '{}'"), ("restored", "Stage '{}' is cached - skipping run"),
             ("unchanged", "Stage '{}' didn't change, skipping"))
BAD_INPUT_EXIT = 2  # a stage's "bad input or config" exit code (tasks/_stage.py): retrying cannot help


@dataclass(frozen=True)
class Stage:
    """A DVC stage (``score@0`` for a foreach item) and the stages whose outputs it reads."""

    name: str
    upstream: tuple[str, ...]


def stage_graph(workspace: Path) -> list[Stage]:
    """The stages of ``workspace``'s dvc.yaml in an order where every stage follows its upstream."""
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
        return [Stage(s.name, tuple(sorted(u.name for u in graph.successors(s)))) for s in order]
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


def run_stage(workspace: Path, name: str, *, env: dict[str, str] | None = None, timeout: float | None = None,
              on_line: Callable[[str], None] = lambda line: None, keep: int = 40) -> StageRun:
    """Run one stage through DVC in a subprocess, passing each output line to ``on_line``.

    Past ``timeout`` seconds the whole process group (DVC and the stage it runs) is killed and the
    outcome is ``timed out``. DVC's lock wait lets fold stages run side by side.
    """
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", name]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    tail: deque[str] = deque(maxlen=keep)
    reported = "unknown"
    try:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            if reported == "unknown":
                reported = outcome_of(name, [line])
            on_line(line)
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
    if timed_out.is_set():
        outcome = "timed out"
    elif rc != 0:
        outcome = "failed"
    else:
        outcome = reported
    return StageRun(name, outcome, rc, round(time.monotonic() - started, 2), tuple(tail))

