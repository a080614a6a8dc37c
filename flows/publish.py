"""What a curation run publishes to Prefect: a markdown summary and a table of the pruned samples.

Both are built from the workspace's own files (params.yaml, metrics/, the selection table), so
they say exactly what DVC recorded; parts a workspace does not have yet are left out.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from semiprune_core.io import read_metrics, read_parquet

SUMMARY_KEY = "semiprune-run"
PRUNED_KEY = "semiprune-pruned"
SELECTION = Path("artifacts/select/selection.parquet")
REUSED = ("restored", "unchanged")


def summary_markdown(ws: Path, records: list[dict]) -> str:
    """Params, stage outcomes and timings, what was re-used, selection and accuracy, in markdown."""
    rows = "\n".join(f"| {r['name']} | {r['outcome']} | {r['seconds']:.1f} | {r.get('device') or ''} |"
                     for r in records)
    reused = [r["name"] for r in records if r["outcome"] in REUSED]
    parts = [f"# semiprune run: `{ws.name}`", "",
             "| stage | outcome | seconds | GPU |", "|---|---|---|---|", rows, "",
             f"Re-used from cache: {', '.join(reused) or 'nothing'}.",
             f"Ran: {', '.join(r['name'] for r in records if r['outcome'] == 'ran') or 'nothing'}."]
    select, evaluate = read_metrics(ws / "metrics/select.json"), read_metrics(ws / "metrics/evaluate.json")
    if select:
        parts += ["", "## Selection", "",
                  f"Strategy `{select.get('strategy')}` on score `{select.get('score')}` at pruning ratio "
                  f"{select.get('ratio')}: kept {select.get('n_kept')} of {select.get('n_pool')}, "
                  f"pruned {select.get('n_pruned')}.", "",
                  "| reason | samples |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in select.get("reasons", {}).items())]
    if evaluate:
        acc = evaluate.get("test_accuracy")
        parts += ["", "## Coreset evaluation", "",
                  f"Test accuracy {acc:.2%}" if isinstance(acc, (int, float)) else "No test split: no test accuracy",
                  f"after {evaluate.get('epochs')} epochs on {evaluate.get('coreset_size')} samples "
                  f"({evaluate.get('labels')} labels, {evaluate.get('labels_used')} labels used, "
                  f"{evaluate.get('train_seconds')} s)."]
    params = ws / "params.yaml"
    if params.exists():
        parts += ["", "## Params", "", "```yaml", yaml.safe_dump(yaml.safe_load(params.read_text()), sort_keys=False).rstrip(),
                  "```"]
    return "\n".join(parts) + "\n"


def pruned_rows(ws: Path, max_rows: int) -> tuple[list[dict], int]:
    """The pruned samples, hardest-ranked first (at most ``max_rows``), and how many there are."""
    path = ws / SELECTION
    if not path.exists():
        return [], 0
    import pyarrow.compute as pc

    table = read_parquet(path)
    pruned = table.filter(pc.invert(table["is_kept"])).drop_columns(["is_kept"])
    top = pruned.take(pc.sort_indices(pruned, [("rank", "descending")])[:max_rows])
    top = top.set_column(top.schema.get_field_index("reason"), "reason", top["reason"].cast("string"))
    return top.to_pylist(), pruned.num_rows


def refresh_report(ws: Path, records: list[dict], project: Path | None) -> Path | None:
    """Record the run and rebuild ``reports/report.html`` when this run changed anything it shows."""
    from .report import REPORT, build_report, record_run

    record_run(ws, records)
    if not (ws / "artifacts/audit/audit.parquet").exists():
        return None
    if (ws / REPORT).exists() and all(r["outcome"] == "unchanged" for r in records if r["name"] != "source"):
        return ws / REPORT
    return build_report(ws, project)


def publish_run(ws: Path, records: list[dict], *, max_rows: int = 1000, project: Path | None = None) -> None:
    """Publish the summary (key ``semiprune-run``), the pruned-samples table (``semiprune-pruned``)
    and a link to the report (``semiprune-report``)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    report = refresh_report(ws, records, project)
    summary = summary_markdown(ws, records)
    if report is not None:
        summary += f"\nReport: [{report}]({report.resolve().as_uri()})\n"
        create_link_artifact(key="semiprune-report", link=report.resolve().as_uri(), link_text=str(report),
                             description=f"the HTML report of workspace {ws.name}")
    create_markdown_artifact(key=SUMMARY_KEY, markdown=summary,
                             description=f"stages, cache re-use, selection and accuracy of workspace {ws.name}")
    rows, total = pruned_rows(ws, max_rows)
    if total:
        shown = "all" if len(rows) == total else f"the {len(rows)} ranked hardest"
        create_table_artifact(key=PRUNED_KEY, table=rows,
                              description=f"{total} pruned samples ({shown} shown) with the reason for each; "
                                          f"all of them: {ws / SELECTION}")
