"""A long-lived local Prefect server that ``semiprune`` commands share (``semiprune server start``).

Without ``PREFECT_API_URL``, every flow run starts a temporary Prefect server of its own and stops
it at the end: about 5 s of every ``semiprune run`` on a 2-core machine, more than a ratio-only
change spends restoring its stages from the cache. ``semiprune server start`` runs one server in the
background (its database in ``PREFECT_HOME``, so the run history and the UI persist) and writes its
address to ``$PREFECT_HOME/semiprune-server.json``; every later command that runs a flow finds it
there. A state file whose process has died, or whose server does not answer, is ignored (and
``start`` replaces it), so a crashed server never breaks a run: the run falls back to a
temporary server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from semiprune_core.errors import SemiPruneError
from semiprune_core.io import atomic_path

from .workspace import pid_alive

STATE_NAME = "semiprune-server.json"
LOG_NAME = "semiprune-server.log"


def prefect_home() -> Path:
    """Prefect's home folder, as Prefect resolves it (``PREFECT_HOME``, default ``~/.prefect``)."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def state_path() -> Path:
    return prefect_home() / STATE_NAME


def healthy(api_url: str, *, timeout: float = 1.0) -> bool:
    """Whether a Prefect API answers ``GET /health`` at ``api_url`` (``http://host:port/api``)."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _read_state() -> dict | None:
    try:
        state = json.loads(state_path().read_text())
        return state if isinstance(state, dict) and isinstance(state.get("pid"), int) and isinstance(state.get("url"), str) else None
    except (OSError, ValueError):
        return None


def running() -> dict | None:
    """The state (``url``, ``pid``, ``log``, ``started``) of this home's running server, or None."""
    state = _read_state()
    if state is None or not pid_alive(state["pid"]) or not healthy(state["url"]):
        return None
    return state


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect_command() -> list[str]:
    # Prefect's CLI through this interpreter, which imports prefect wherever the flow runs; its
    # console script may be missing or another install's (a `pip install --target` has none)
    return [sys.executable, "-m", "prefect"]


def start(*, port: int | None = None, timeout: float = 120.0) -> tuple[dict, bool]:
    """Start a background server (unless one runs already); return its state and whether it is new.

    Its output goes to ``$PREFECT_HOME/semiprune-server.log``. Raises :class:`SemiPruneError` when it
    does not answer within ``timeout`` seconds (the process is stopped again).
    """
    current = running()
    if current is not None:
        return current, False
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}/api"
    if healthy(url):
        raise SemiPruneError(f"port {port} already serves a Prefect API that semiprune did not start",
                             f"use it with PREFECT_API_URL={url}, or pick another --port")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    log = home / LOG_NAME
    with open(log, "ab") as out:
        proc = subprocess.Popen([*_prefect_command(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own session: Ctrl-C in this terminal leaves it running
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            _terminate(proc.pid)
            tail = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise SemiPruneError(f"the Prefect server did not start ({tail[:200]})", f"see {log}")
        time.sleep(0.25)
    state = {"url": url, "pid": proc.pid, "log": str(log), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_path(state_path()) as tmp:
        Path(tmp).write_text(json.dumps(state) + "\n")
    return state, True


def _terminate(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:  # not our child (started by another command): poll instead
                if not pid_alive(pid):
                    return
            time.sleep(0.1)


def stop() -> dict | None:
    """Stop this home's background server; return its state, or None when none was running."""
    state = _read_state()
    state_path().unlink(missing_ok=True)
    if state is None or not pid_alive(state["pid"]):
        return None
    _terminate(state["pid"])
    return state


def use_running_server() -> str | None:
    """Point this process (and its children) at the running server when ``PREFECT_API_URL`` is unset.

    Returns the URL it set, or None (the variable was set already, or no server runs: Prefect then
    starts a temporary one for the run). Call it before Prefect reads its settings.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    state = running()
    if state is None:
        return None
    os.environ["PREFECT_API_URL"] = state["url"]
    return state["url"]
