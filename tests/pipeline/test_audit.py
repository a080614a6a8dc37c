"""The audit trail on a real smoke run: the table, `explain`, `export` and `diff` as people use them."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from .conftest import SMOKE, needs_fmnist, run_cli

pytestmark = needs_fmnist


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_the_audit_table_has_one_row_per_pool_sample_with_its_evidence(smoke):
    ws = smoke / "runs" / "smoke"
    table = pq.read_table(ws / "artifacts/audit/audit.parquet")
    audit = table.to_pandas()
    assert len(audit) == 2000 and audit["sample_id"].is_unique
    assert {"sample_id", "path", "label", "target", "label_source", "pseudo_confidence", "fold", "oos_aum",
            "oos_aum_pct", "ins_aum", "ins_aum_pct", "oos_dual_pct", "strategy", "stratum", "rank", "is_kept",
            "reason", "hidden_true_label"} <= set(audit)
    selection = pq.read_table(ws / "artifacts/select/selection.parquet").to_pandas()
    for column in ("sample_id", "is_kept", "rank", "reason"):
        assert audit[column].astype(str).tolist() == selection[column].astype(str).tolist(), column
    assert audit["label"].notna().sum() == 100 and (audit.loc[audit["label"].notna(), "label_source"] == "human").all()
    assert set(audit["fold"]) == {0, 1} and (audit["strategy"] == "aum_cutoff").all()
    order = np.argsort(audit["oos_aum"].to_numpy(), kind="stable")
    assert np.all(np.diff(audit["oos_aum_pct"].to_numpy()[order]) >= 0)  # percentiles follow the score
    assert audit["oos_aum_pct"].between(0, 100).all()
    meta = json.loads(table.schema.metadata[b"semiprune"])
    assert meta["params"]["select"]["ratio"] == 0.5 and meta["params"]["ssl"]["algorithm"] == "fixmatch"
    assert meta["code_version"]["semiprune"] and len(meta["class_names"]) == 10
    assert all(len(digest) == 64 for digest in meta["inputs"].values()) and len(meta["inputs"]) == 4


def test_explain_tells_one_samples_story(smoke):
    selection = pq.read_table(smoke / "runs/smoke/artifacts/select/selection.parquet").to_pandas()
    pruned = selection.loc[selection["reason"].astype(str).str.startswith("pruned: beyond"), "sample_id"].iloc[0]
    text = run_cli(smoke, "explain", *SMOKE, pruned, check=True).stdout
    assert text.startswith(f"{pruned}: PRUNED - pruned: beyond the hard cutoff (likely wrong label)")
    assert "a pseudo-label from the SSL model (confidence" in text and "the unseen model (fold " in text
    assert "the models that trained on it: ins_aum" in text and "rule: strategy aum_cutoff by oos_aum" in text
    facts = strict_json(run_cli(smoke, "explain", *SMOKE, pruned, "--json", check=True).stdout)
    assert facts["is_kept"] is False and facts["rule"] == "cutoff_pruned" and facts["score_used"] == "oos_aum"
    assert 0 <= facts["percentiles"]["oos_aum"] <= 100 and facts["hidden_true_label"]


def test_an_unknown_id_gets_near_matches(smoke):
    proc = run_cli(smoke, "explain", *SMOKE, "train/15")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: no sample 'train/15' in the audit table of smoke; did you mean train/000015, "
        + proc.stderr.split("train/000015, ", 1)[1].strip()]


def test_export_writes_the_kept_or_pruned_samples_for_a_training_job(smoke, tmp_path):
    ws = smoke / "runs" / "smoke"
    ids = run_cli(smoke, "export", *SMOKE, check=True).stdout
    assert ids == (ws / "artifacts/select/kept.txt").read_text()
    run_cli(smoke, "export", *SMOKE, "--pruned", "-o", str(tmp_path / "pruned.parquet"), check=True)
    pruned = pq.read_table(tmp_path / "pruned.parquet").to_pandas()
    assert len(pruned) == 1000 and pruned["reason"].str.startswith("pruned").all()
    run_cli(smoke, "export", *SMOKE, "-o", str(tmp_path / "kept.csv"), check=True)
    assert (tmp_path / "kept.csv").read_text().splitlines()[0] == '"sample_id","target","label_source","reason","rank"'
    proc = run_cli(smoke, "export", *SMOKE, "--paths")
    assert proc.returncode == 2 and "no image files" in proc.stderr
    proc = run_cli(smoke, "export", *SMOKE, "-o", str(tmp_path / "kept.xlsx"))
    assert proc.returncode == 2 and "unknown format '.xlsx'" in proc.stderr and not (tmp_path / "kept.xlsx").exists()


def test_diff_says_which_samples_changed_and_why(smoke):
    # 0.8: other tests run 0.7 and expect it not to be in the run-cache yet
    run_cli(smoke, "run", "--profile", "smoke", "--set", "select.ratio=0.8", "--name", "r08", check=True)
    d = json.loads(run_cli(smoke, "diff", "smoke", "r08", "--json", check=True).stdout)
    assert d["moves"]["kept -> pruned"] - d["moves"].get("pruned -> kept", 0) == 600
    assert d["params_changed"] == ["select.ratio: 0.5 -> 0.8"]
    assert sum(sum(c.values()) for c in d["per_class"].values()) == d["moves"]["kept -> pruned"] + d["moves"].get("pruned -> kept", 0)
    assert d["reasons"] and all(r["a"].split(":")[0] != r["b"].split(":")[0] for r in d["reasons"])  # kept <-> pruned
    text = run_cli(smoke, "diff", "smoke", "r08", check=True).stdout
    assert text.startswith("run smoke -> run r08: ") and "select.ratio: 0.5 -> 0.8" in text


def test_diff_refuses_what_has_no_results(smoke):
    proc = run_cli(smoke, "diff", "smoke", "nope")
    assert proc.returncode == 2 and "'nope' is neither a run under runs/ nor a git revision" in proc.stderr
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "add", "-A"], cwd=smoke, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "code only, no results"], cwd=smoke, check=True, capture_output=True)
    proc = run_cli(smoke, "diff", "HEAD", "smoke")
    assert proc.returncode == 2 and "revision 'HEAD' has no results" in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", [["explain", "train/000001"], ["export"]])
def test_audit_commands_before_any_run_say_so(project, command):
    proc = run_cli(project, *command)
    assert proc.returncode == 2 and "the pipeline has not run there yet" in proc.stderr


def test_duckdb_reads_the_audit_table_as_is(smoke):
    import duckdb

    path = smoke / "runs/smoke/artifacts/audit/audit.parquet"
    rows = duckdb.sql(f"SELECT is_kept, count(*) FROM '{path}' GROUP BY is_kept ORDER BY is_kept").fetchall()
    assert rows == [(False, 1000), (True, 1000)]
