"""The HTML report as a person sees it (headless Chromium), its Prefect link, and `dvc plots show`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from .conftest import SMOKE, needs_fmnist, run_cli, run_dvc

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# scripts/test.sh installs Debian's chromium; only a machine where it cannot may skip
needs_chromium = pytest.mark.skipif(not CHROMIUM and os.environ.get("CI") != "true",
                                    reason="chromium not installed (scripts/test.sh installs it where apt-get may)")


def chromium(*args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM, "CI must have chromium: scripts/test.sh installs it"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


@needs_fmnist
@needs_chromium
def test_the_report_renders_in_a_browser_with_every_figure_loaded(smoke, tmp_path):
    report = smoke / "runs/smoke/reports/report.html"
    assert report.exists(), "the flow writes the report after each run"
    html = report.read_text()
    assert "<h2>Pruned as likely mislabeled</h2>" in html and "<h2>Hardest samples kept</h2>" in html
    assert "<h2>Pseudo-labels against the hidden true labels</h2>" in html and "src=\"http" not in html  # self-contained
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", report.as_uri()).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-2000:]
    assert int(loaded[1]) == int(loaded[2]) >= 5  # every embedded figure decoded
    shot = tmp_path / "report.png"
    chromium("--window-size=1200,3000", f"--screenshot={shot}", report.as_uri())
    assert shot.stat().st_size > 50_000  # a page of figures, not a blank one


@needs_fmnist
def test_the_flow_links_the_report_and_the_command_rebuilds_it(smoke):
    from prefect.artifacts import Artifact

    run_cli(smoke, "run", *SMOKE, check=True)
    link = Artifact.get("semiprune-report")
    assert link.data.endswith("/runs/smoke/reports/report.html)")  # a markdown link to the file
    report = smoke / "runs/smoke/reports/report.html"
    report.unlink()
    run_cli(smoke, "report", *SMOKE, check=True)
    assert "<h2>Summary</h2>" in report.read_text()


@needs_fmnist
def test_dvc_plots_show_lists_the_pipelines_plots(smoke):
    proc = run_dvc(smoke / "runs" / "smoke", "plots", "show", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    names = set(shown["data"])
    assert {"plots/class_counts.csv", "plots/evaluate_history.csv", "plots/ssl_history.csv"} <= names, sorted(names)


def test_a_report_before_any_run_is_refused(project):
    proc = run_cli(project, "report")
    assert proc.returncode == 2 and "the pipeline has not run there yet" in proc.stderr.splitlines()[-1]
