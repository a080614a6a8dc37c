"""``semiprune sweep``: select + evaluate for every (strategy, ratio), on the dynamics computed once.

Each combination is a run workspace (``runs/<profile>-<hash>``) whose params differ from the base
only in ``select``; every stage before ``select`` has the same code, params and inputs as in any
other combination, so DVC restores it from the shared run-cache instead of training again. An
interrupted sweep resumes the same way: finished combinations are restored, not re-run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from semiprune_core.errors import ConfigError
from semiprune_core.io import atomic_path, read_metrics

from .curation import run_curation
from .workspace import clear_stale_dvc_locks, effective_params, ensure_workspace, workspace_name


@dataclass(frozen=True)
class SweepRun:
    strategy: str
    score: str
    ratio: float
    overrides: tuple[str, ...]
    name: str
    params: dict


@dataclass(frozen=True)
class SweepTable:
    rows: list[dict]
    markdown: str
    path: Path
    parquet: Path


COLUMNS = ("strategy", "score", "ratio", "n_kept", "test_accuracy", "labels_used", "select_seconds",
           "evaluate_seconds", "ran", "workspace")


def plan_sweep(project: Path, *, profile: str | None, overrides: list[str], ratios: list[float],
               strategies: list[str]) -> list[SweepRun]:
    """Every (strategy[:score], ratio), validated before anything runs."""
    flags = {"ratio": "--ratios", "strategy": "--strategies"}
    for what, values in (("ratio", ratios), ("strategy", strategies)):
        if not values:
            raise ConfigError(f"the sweep has no {what}", f"give at least one with {flags[what]}")
        dupes = sorted({str(v) for v in values if values.count(v) > 1})
        if dupes:
            raise ConfigError(f"duplicate {what} in the sweep: {', '.join(dupes)}", "list each once")
    plan = []
    for spec in strategies:
        strategy, _, score = spec.partition(":")
        for ratio in ratios:
            sets = [*overrides, f"select.strategy={strategy}", f"select.ratio={ratio}"]
            if score:
                sets.append(f"select.score={score}")
            params = effective_params(project, profile=profile, overrides=sets)
            plan.append(SweepRun(strategy, params["select"]["score"], ratio, tuple(sets),
                                 workspace_name(profile, sets), params))
    return plan


def _row(run: SweepRun, ws: Path, records: list[dict]) -> dict:
    select, evaluate = read_metrics(ws / "metrics/select.json"), read_metrics(ws / "metrics/evaluate.json")
    return {"strategy": run.strategy, "score": run.score if run.strategy not in ("random", "prototypicality") else "",
            "ratio": run.ratio, "n_kept": select.get("n_kept"), "test_accuracy": evaluate.get("test_accuracy"),
            "labels_used": evaluate.get("labels_used"), "select_seconds": select.get("wall_time_s"),
            "evaluate_seconds": evaluate.get("wall_time_s"),
            "ran": ",".join(r["name"] for r in records if r["outcome"] == "ran"), "workspace": run.name}


def markdown_table(rows: list[dict]) -> str:
    def cell(key, value):
        if value is None:
            return "-"
        if key == "test_accuracy":
            return f"{value:.2%}"
        return str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out: Path) -> SweepTable:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows)
    md, parquet = out / "sweep.md", out / "sweep.parquet"
    with atomic_path(parquet) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    with atomic_path(md) as tmp:
        tmp.write_text("# semiprune sweep\n\nFinal-epoch test accuracy of a model trained on each coreset.\n\n" + text)
    return SweepTable(rows, text, md, parquet)


@flow(name="semiprune-sweep", log_prints=True, validate_parameters=False)
def sweep_flow(project: str, plan: list[SweepRun], workers: int = 2, stage_timeout: float | None = None,
               gpus: list[str] | None = None, out: str | None = None, wait: bool = False) -> SweepTable:
    from prefect.artifacts import create_markdown_artifact

    root, rows = Path(project), []
    for i, run in enumerate(plan, 1):
        print(f"sweep {i}/{len(plan)}: {run.strategy} ({run.score}) at ratio {run.ratio} in runs/{run.name}")
        ws = ensure_workspace(root, run.name, run.params)
        clear_stale_dvc_locks(ws)
        records = run_curation(ws, project=root, workers=workers, stage_timeout=stage_timeout, gpus=gpus, wait=wait)
        rows.append(_row(run, ws, records))
    table = write_table(rows, Path(out) if out else root / "reports" / "sweep")
    create_markdown_artifact(key="semiprune-sweep", markdown=table.markdown, description="sweep over strategies and ratios")
    return table


def run_sweep(project: Path, plan: list[SweepRun], *, workers: int = 2, stage_timeout: float | None = None,
              gpus: list[str] | None = None, out: Path | None = None, wait: bool = False) -> SweepTable:
    return sweep_flow(str(project), plan, workers, stage_timeout, gpus, str(out) if out else None, wait)
