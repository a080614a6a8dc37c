"""`semiprune bench` on a small suite: the grid, the table over seeds, resuming, and bad grids."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from .conftest import needs_fmnist, run_cli

SUITE = "benchmarks/suites/smoke.yaml"


@needs_fmnist
def test_a_bench_reports_mean_and_spread_over_seeds_and_resumes_where_it_stopped(project):
    grid = ["--methods", "random", "unseen", "--ratios", "0.5"]
    run_cli(project, "bench", SUITE, *grid, "--seeds", "0", check=True)  # a bench stopped after seed 0
    out = project / "reports/bench/smoke"
    done = {p.parent.parent.parent.name: p.stat().st_mtime_ns
            for p in (project / "runs").glob("*/artifacts/select/selection.parquet")}
    assert len(done) == 2

    proc = run_cli(project, "bench", SUITE, *grid, "--seeds", "0", "1", check=True)
    again = {p.parent.parent.parent.name: p.stat().st_mtime_ns
             for p in (project / "runs").glob("*/artifacts/select/selection.parquet")}
    assert len(again) == 4 and all(again[name] == mtime for name, mtime in done.items())  # seed 0 not redone

    rows = pq.read_table(out / "bench.parquet").to_pandas()
    assert sorted(zip(rows["method"], rows["seed"])) == [("random", 0), ("random", 1), ("unseen", 0), ("unseen", 1)]
    assert rows["test_accuracy"].between(0.05, 1).all() and (rows["labels_used"] >= 1000).all()
    assert (rows.loc[rows["method"] == "unseen", "sample_passes"] > 0).all()
    summary = pq.read_table(out / "bench_summary.parquet").to_pandas()
    unseen = summary[summary["method"] == "unseen"].iloc[0]
    accs = rows.loc[rows["method"] == "unseen", "test_accuracy"]
    assert unseen["seeds"] == 2 and unseen["acc_mean"] == pytest.approx(accs.mean())
    assert unseen["acc_std"] == pytest.approx(accs.std(ddof=1))
    table = (out / "bench.md").read_text()
    assert "| unseen | " in table and " ± " in table and "prune 50%" in table and table in proc.stdout + "\n"
    assert (out / "accuracy_vs_ratio_standard.png").stat().st_size > 1000


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "greedy"], "unknown method 'greedy'"),
    (["--variants", "rotated"], "unknown variant 'rotated'"),
    (["--seeds", "1", "1"], "duplicate seed in the bench grid: 1"),
    (["--ratios"], "expected at least one argument"),
    (["--methods", "random", "--variants", "labels:0"], "bad variant 'labels:0'"),
])
def test_a_bad_grid_is_refused_before_anything_runs(project, args, message):
    proc = run_cli(project, "bench", SUITE, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1500:]
    assert not (project / "runs").exists()


def test_an_unknown_suite_file_is_refused(project):
    proc = run_cli(project, "bench", "benchmarks/suites/nope.yaml")
    assert proc.returncode == 2 and "bench suite benchmarks/suites/nope.yaml not found" in proc.stderr
