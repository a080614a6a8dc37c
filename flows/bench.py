"""``semiprune bench``: methods x pruning ratios x seeds x dataset variants, one results table.

Every cell is a run workspace whose params are the suite's base params plus the method's, the
variant's, the seed's and the ratio's overrides. Runs that share their upstream params (the same
seed and variant) share the cached SSL model and fold dynamics through DVC's run-cache, so a bench
trains each of those once; an interrupted bench resumes the same way (finished cells are restored).

Suites live in ``benchmarks/suites/*.yaml`` so a published table is one command away.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from semiprune_core.errors import ConfigError
from semiprune_core.io import atomic_path, read_metrics

from .curation import run_curation
from .workspace import clear_stale_dvc_locks, effective_params, ensure_workspace, workspace_name

#: What each method sets. Label-efficient methods use the SSL pseudo-labels; the oracle the true
#: labels; label_free k-means clusters of pixels.
METHODS: dict[str, list[str]] = {
    "random": ["select.strategy=random"],
    "semiprune": ["select.strategy=aum_cutoff", "select.score=ins_aum"],  # in-sample, as published
    "unseen": ["select.strategy=aum_cutoff", "select.score=oos_aum"],  # the same rule, out-of-sample
    "unseen_ccs": ["select.strategy=ccs", "select.score=oos_aum"],  # coverage-centric on out-of-sample AUM
    "unseen_dual": ["select.strategy=dual_beta", "select.score=oos_dual"],
    "unseen_multistep": ["select.strategy=unseen_multistep", "select.score=oos_aum"],
    "prototypicality": ["select.strategy=prototypicality"],
    "label_free": ["pseudo.targets=clusters", "select.strategy=aum_cutoff", "select.score=oos_aum"],
    "oracle": ["pseudo.targets=oracle", "select.strategy=aum_cutoff", "select.score=oos_aum"],
}
VARIANTS: dict[str, list[str]] = {
    "standard": [],
    "long_tailed": ["data.long_tail.imbalance=0.1"],
    "corrupted": ["data.corrupt.share=0.2"],
}
#: the metrics files of the stages whose compute a method spends
STAGE_METRICS = {"ssl_train": "ssl", "score": "score_fold_*", "select": "select", "evaluate": "evaluate"}
#: what each method needs (the rest run in its workspace only because the pipeline is one graph):
#: random reads no score; prototypicality only the SSL model's features; the oracle and
#: label_free never train the SSL model
METHOD_STAGES = {"random": ("evaluate",), "prototypicality": ("ssl_train", "select", "evaluate"),
                 "oracle": ("score", "select", "evaluate"), "label_free": ("score", "select", "evaluate")}


@dataclass(frozen=True)
class Cell:
    method: str
    variant: str
    seed: int
    ratio: float
    name: str
    params: dict


def variant_overrides(variant: str) -> list[str]:
    """``standard``, ``long_tailed``, ``corrupted``, or ``labels:N`` (N human labels per class)."""
    if variant.startswith("labels:"):
        count = variant.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"bad variant {variant!r}", "write labels:N with N labels per class, e.g. labels:60")
        return [f"data.labeled.per_class={int(count)}"]
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}", f"choose from {', '.join(VARIANTS)} or labels:N")
    return VARIANTS[variant]


def read_suite(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"bench suite {path} not found", "name a file in benchmarks/suites/")
    suite = yaml.safe_load(path.read_text()) or {}
    unknown = set(suite) - {"profile", "set", "methods", "ratios", "seeds", "variants"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}", "use profile, set, methods, ratios, seeds, variants")
    return suite


def plan_bench(project: Path, *, profile: str | None, overrides: list[str], methods: list[str], ratios: list[float],
               seeds: list[int], variants: list[str]) -> list[Cell]:
    """Every cell of the grid, its params validated before anything runs."""
    for what, values in (("method", methods), ("ratio", ratios), ("seed", seeds), ("variant", variants)):
        if not values:
            raise ConfigError(f"the bench grid has no {what}", f"list at least one {what}")
        dupes = sorted({str(v) for v in values if list(values).count(v) > 1})
        if dupes:
            raise ConfigError(f"duplicate {what} in the bench grid: {', '.join(dupes)}", f"list each {what} once")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}", f"choose from {', '.join(METHODS)}")
    cells = []
    for variant in variants:
        vsets = variant_overrides(variant)
        for seed in seeds:
            for method in methods:
                for ratio in ratios:
                    sets = [*overrides, *vsets, f"base.seed={seed}", *METHODS[method], f"select.ratio={ratio}"]
                    params = effective_params(project, profile=profile, overrides=sets)
                    cells.append(Cell(method, variant, seed, ratio, workspace_name(profile, sets), params))
    return cells


def cell_row(cell: Cell, ws: Path) -> dict:
    """One cell's result: final-epoch test accuracy, labels used, and the compute the method spent."""
    evaluate = read_metrics(ws / "metrics/evaluate.json")
    passes, seconds = 0, 0.0
    needed = METHOD_STAGES.get(cell.method, tuple(STAGE_METRICS))
    for stage, pattern in STAGE_METRICS.items():
        if stage not in needed:
            continue
        for path in sorted((ws / "metrics").glob(f"{pattern}.json")):
            m = read_metrics(path)
            passes += int(m.get("sample_passes") or 0)
            seconds += float(m.get("wall_time_s") or 0)
    labels = evaluate.get("labels_used")
    if cell.method == "oracle":  # it read every sample's true label
        labels = read_metrics(ws / "metrics/select.json").get("n_pool", labels)
    return {"variant": cell.variant, "method": cell.method, "ratio": cell.ratio, "seed": cell.seed,
            "test_accuracy": evaluate.get("test_accuracy"), "labels_used": labels,
            "sample_passes": passes, "seconds": round(seconds, 1), "workspace": cell.name}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and spread (sample standard deviation) over seeds per (variant, method, ratio)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["method"], r["ratio"]), []).append(r)
    out = []
    for (variant, method, ratio), rs in groups.items():
        accs = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
        out.append({"variant": variant, "method": method, "ratio": ratio, "seeds": len(rs),
                    "acc_mean": statistics.fmean(accs) if accs else None,
                    "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0 if accs else None,
                    "labels_used": statistics.fmean(r["labels_used"] or 0 for r in rs),
                    "sample_passes": statistics.fmean(r["sample_passes"] for r in rs),
                    "seconds": statistics.fmean(r["seconds"] for r in rs)})
    return out


def markdown(summary: list[dict]) -> str:
    parts = []
    for variant in dict.fromkeys(r["variant"] for r in summary):
        rows = [r for r in summary if r["variant"] == variant]
        ratios = sorted({r["ratio"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        cell = {(r["method"], r["ratio"]): r for r in rows}
        head = ["method", *(f"prune {ratio:.0%}" for ratio in ratios), "labels used", "sample passes", "seconds"]
        lines = [f"### {variant}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            accs = [cell.get((m, ratio)) for ratio in ratios]
            text = [f"{c['acc_mean']:.2%} ± {c['acc_std']:.2%}" if c and c["acc_mean"] is not None else "-" for c in accs]
            last = [c for c in accs if c][-1]
            lines.append(f"| {m} | " + " | ".join(text) + f" | {last['labels_used']:,.0f} | {last['sample_passes']:,.0f} | "
                         f"{last['seconds']:,.0f} |")
        parts.append("\n".join(lines))
    return ("Final-epoch test accuracy of a model trained on each coreset, mean ± standard deviation over "
            "seeds; labels used, sample passes and seconds are per run at the largest ratio.\n\n" + "\n\n".join(parts) + "\n")


def write_results(rows: list[dict], out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from semiprune_core import report

    summary = aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "bench.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    with atomic_path(out / "bench_summary.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(summary), tmp)
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text("# semiprune bench\n\n" + markdown(summary), encoding="utf-8")
    for variant in dict.fromkeys(r["variant"] for r in summary):
        points = [{"strategy": r["method"], "ratio": r["ratio"], "test_accuracy": r["acc_mean"]}
                  for r in summary if r["variant"] == variant]
        with atomic_path(out / f"accuracy_vs_ratio_{variant.replace(':', '_')}.png") as tmp:
            tmp.write_bytes(report.accuracy_vs_ratio(points))
    return out / "bench.md"


def run_bench(project: Path, cells: list[Cell], out: Path, **curation) -> Path:
    """Run every cell (finished ones are restored from the cache), then write the tables and plots."""
    rows = []
    for i, cell in enumerate(cells, 1):
        print(f"bench {i}/{len(cells)}: {cell.method} at ratio {cell.ratio}, seed {cell.seed}, {cell.variant} "
              f"(runs/{cell.name})", flush=True)
        ws = ensure_workspace(project, cell.name, cell.params)
        clear_stale_dvc_locks(ws)
        run_curation(ws, project=project, **curation)
        rows.append(cell_row(cell, ws))
    return write_results(rows, out)
