"""A real copy of the project in a temp folder, run with the real `semiprune` and `dvc` commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="Fashion-MNIST not installed (scripts/setup.sh installs dataset-fashion-mnist)"
)


def _project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    return [f for f in out if (REPO / f).is_file() and f != "dvc.lock"]  # a local run's lock is not the project's


def copy_project(dest: Path) -> Path:
    """The project's tracked and untracked-but-not-ignored files, in a fresh git repository at ``dest``."""
    for rel in _project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="session", autouse=True)
def _prefect_server(prefect_harness):
    """`semiprune run` is a Prefect flow: every command here reports to the session's test server."""
    return prefect_harness


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


SMOKE = ["--profile", "smoke", "--name", "smoke"]


def ran(proc: subprocess.CompletedProcess) -> set[str]:
    """The stages whose command DVC actually executed in this run."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, _prefect_server) -> Path:
    """A project copy after one full smoke-profile run of the whole pipeline (workspace runs/smoke).

    Shared by several modules: a test that changes it puts it back as it was.
    """
    if not FMNIST.exists():
        pytest.skip("Fashion-MNIST not installed")
    project = copy_project(tmp_path_factory.mktemp("smoke") / "project")
    proc = run_cli(project, "run", *SMOKE, check=True)
    assert ran(proc) == {"source", "prepare", "ssl_train", "pseudo_label", "score@0", "score@1", "scores", "select",
                         "audit", "evaluate"}
    return project


def run_cli(project: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", SEMIPRUNE_LOG_LEVEL="WARNING")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"semiprune {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def run_dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(project / ".semiprune" / "dvc-site"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
