"""Tiny real DVC repositories for the flow tests (Prefect's harness is in tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def dvc_env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dvc_repo(path: Path, dvc_yaml: str, scripts: dict[str, str] | None = None) -> Path:
    """A git + DVC repository at ``path`` with ``dvc_yaml`` and helper scripts."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True, env=dvc_env())
    (path / "dvc.yaml").write_text(dvc_yaml)
    for name, text in (scripts or {}).items():
        (path / name).write_text(text)
    return path
