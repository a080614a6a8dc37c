"""The prepare stage as users run it: `semiprune run` and plain `dvc repro` on a real project copy."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from .conftest import needs_fmnist, run_cli, run_dvc


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_fmnist
def test_smoke_profile_runs_in_its_own_workspace_and_leaves_params_yaml_alone(project):
    before = sha(project / "params.yaml")
    run_cli(project, "run", "--profile", "smoke", "prepare", check=True)
    assert sha(project / "params.yaml") == before
    ws = project / "runs" / "smoke"
    manifest = pq.read_table(ws / "artifacts/prepare/manifest.parquet").to_pandas()
    assert len(manifest) == 2500
    assert manifest["sample_id"].is_unique
    assert (manifest["split"] == "train").sum() == 2000
    labeled = manifest[manifest["is_labeled"]]
    assert len(labeled) == 100 and labeled["label"].value_counts().eq(10).all()
    assert not list(project.glob("artifacts/**/*.parquet")), "a profile run must not write into the project's own outputs"


@needs_fmnist
def test_rerun_is_byte_identical_and_nothing_is_stale(project):
    run_cli(project, "run", "--profile", "smoke", "prepare", check=True)
    ws = project / "runs" / "smoke"
    first = {p.name: sha(p) for p in (ws / "artifacts/prepare").glob("*.parquet")}
    run_cli(project, "run", "--profile", "smoke", "--force", "prepare", check=True)
    assert {p.name: sha(p) for p in (ws / "artifacts/prepare").glob("*.parquet")} == first
    status = {r["stage"]: r for r in json.loads(run_cli(project, "status", "--profile", "smoke", "--json", check=True).stdout)}
    assert status["prepare"]["state"] == "up to date" and status["source"]["state"] == "checks", status


@needs_fmnist
def test_set_override_gets_its_own_workspace(project):
    run_cli(project, "run", "--profile", "smoke", "--set", "data.labeled.per_class=5", "prepare", check=True)
    (ws,) = [p for p in (project / "runs").iterdir() if p.name.startswith("smoke-")]
    manifest = pq.read_table(ws / "artifacts/prepare/manifest.parquet", columns=["is_labeled"]).to_pandas()
    assert manifest["is_labeled"].sum() == 50


@needs_fmnist
@pytest.mark.slow
def test_plain_dvc_repro_prepares_full_fashion_mnist(project):
    proc = run_dvc(project, "repro", "prepare")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = pq.read_table(project / "artifacts/prepare/manifest.parquet")
    split = np.asarray(manifest["split"])
    assert manifest.num_rows == 70_000 and (split == "train").sum() == 60_000 and (split == "test").sum() == 10_000
    assert len(set(manifest["sample_id"].to_pylist())) == 70_000


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.labeled.per_class=ten", "data.labeled.per_class"),
        ("data.colour=red", "data.colour: unknown key"),
        ("data.source=imagenet", "data.source"),
        ("data.corrupt.share=1.5", "data.corrupt.share"),
    ],
)
def test_bad_params_fail_fast_with_one_line_and_write_nothing(project, override, needle):
    proc = run_cli(project, "run", "--set", override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not (project / "runs").exists() and not list(project.glob("artifacts/**/*.parquet"))


def test_unknown_profile_names_the_known_ones(project):
    proc = run_cli(project, "run", "--profile", "nope")
    assert proc.returncode == 2 and "smoke" in proc.stderr


def test_bad_data_fails_the_stage_with_exit_2_and_no_outputs(project):
    # 600 synthetic train samples over 10 classes cannot give 100 labels per class.
    proc = run_cli(project, "run", "--profile", "synthetic", "--set", "data.synthetic.n_train=600",
                   "--set", "data.labeled.per_class=100")
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "per_class" in proc.stderr
    ws = next((project / "runs").iterdir())
    assert not list((ws / "artifacts/prepare").glob("*.parquet")) if (ws / "artifacts/prepare").exists() else True


def test_prepare_reruns_when_the_image_folder_changes_and_only_then(project, tmp_path):
    from PIL import Image

    def png(path, seed):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(path)

    root = tmp_path / "images"
    for i in range(12):
        png(root / ("cat" if i % 2 else "dog") / f"{i}.png", i)
    args = ["--set", "data.source=imagefolder", "--set", f"data.root={root}", "--set", "data.image_size=8",
            "--set", "data.channels=1", "--set", "data.labeled.per_class=null", "--name", "folder", "prepare"]
    ws = project / "runs" / "folder"
    first = run_cli(project, "run", *args, check=True)
    assert "Running stage 'prepare'" in first.stderr
    again = run_cli(project, "run", *args, check=True)
    assert "Running stage 'source'" in again.stderr and "Running stage 'prepare'" not in again.stderr
    png(root / "cat" / "new.png", 99)
    changed = run_cli(project, "run", *args, check=True)
    assert "Running stage 'prepare'" in changed.stderr
    assert pq.read_table(ws / "artifacts/prepare/manifest.parquet").num_rows == 13
