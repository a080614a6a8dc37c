"""``reports/report.html`` of a workspace: what ran and what it cost, and what the selection did.

Built from the workspace's own files (metrics/, the audit table, the images, the last flow run's
record in ``.semiprune/last_run.json``) and, when a sweep exists, ``reports/sweep/sweep.parquet``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from semiprune_core import report as fig
from semiprune_core.io import atomic_path, column_array, read_metrics, read_parquet

from .audit_commands import load_audit

REPORT = Path("reports/report.html")
LAST_RUN = Path(".semiprune/last_run.json")
#: the metrics file each stage writes (a foreach item's index fills {i})
METRICS = {"prepare": "prepare", "ssl_train": "ssl", "pseudo_label": "pseudo", "score": "score_fold_{i}",
           "scores": "scores", "select": "select", "evaluate": "evaluate"}
GRID_PER_CLASS = 8
#: PNGs by a digest of what they show: a run whose outputs were restored from the cache (a ratio set
#: back) redraws nothing it has drawn before. The newest KEEP_FIGURES are kept.
FIGURES = Path(".semiprune/figures")
KEEP_FIGURES = 64


def record_run(ws: Path, records: list[dict]) -> None:
    """Keep the flow run's stage outcomes for the report's cost table."""
    path = ws / LAST_RUN
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(records, indent=1))


def cost_rows(ws: Path) -> list[list[object]]:
    """(stage, outcome of the last run, seconds, sample passes) per stage with metrics."""
    outcomes = {r["name"]: r["outcome"] for r in json.loads((ws / LAST_RUN).read_text())} if (ws / LAST_RUN).exists() else {}
    folds = sorted(int(p.stem.rpartition("_")[2]) for p in (ws / "metrics").glob("score_fold_*.json"))
    names = list(outcomes) or ["prepare", "ssl_train", "pseudo_label", *(f"score@{k}" for k in folds), "scores", "select",
                               "evaluate"]
    rows = []
    for name in names:
        base, _, item = name.partition("@")
        metrics = read_metrics(ws / "metrics" / f"{METRICS.get(base, base).format(i=item)}.json")
        if not metrics and name not in outcomes:
            continue
        seconds = metrics.get("wall_time_s", "")
        passes = metrics.get("sample_passes", "")
        rows.append([name, outcomes.get(name, "-"), seconds, f"{passes:,}" if isinstance(passes, int) else passes])
    return rows


def _digest(*parts) -> str:
    """SHA-256 of arrays (dtype, shape and bytes) and JSON-able values, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray) and part.dtype != object:
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part.tolist() if isinstance(part, np.ndarray) else part, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _memo_png(ws: Path, key: str, draw) -> bytes:
    """The PNG stored under ``key``, or ``draw()``'s, stored for next time."""
    folder = ws / FIGURES
    path = folder / f"{key[:40]}.png"
    if path.exists():
        path.touch()  # recently used: kept longest
        return path.read_bytes()
    png = draw()
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    for old in sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime_ns)[:-KEEP_FIGURES]:
        old.unlink(missing_ok=True)
    return png


def _figure(ws: Path, make, *args) -> bytes:
    """``make(*args)``, a figure of :mod:`semiprune_core.report`, drawn once per distinct input."""
    return _memo_png(ws, _digest(make.__name__, *args), lambda: make(*args))


def _grid(ws: Path, audit: dict, class_names: list[str], pick, images_file: Path, read_images) -> bytes | None:
    """A grid with one row per class of up to GRID_PER_CLASS samples chosen by ``pick(class) -> indices``.

    Keyed by the chosen ids and captions and the images file's identity, so a drawn grid is reused
    without decoding the images again; ``read_images()`` -> {sample_id: image} is called only to draw.
    """
    rows, caps, ids = [], [], []
    for c, name in enumerate(class_names):
        idx = pick(c)[:GRID_PER_CLASS]
        if len(idx) == 0:
            continue
        rows.append(name)
        caps.append([audit["sample_id"][i].rpartition("/")[2] + (
            f" (true: {class_names[audit['hidden_true_label'][i]]})"
            if "hidden_true_label" in audit and audit["hidden_true_label"][i] != audit["target"][i] else "") for i in idx])
        ids.append([str(audit["sample_id"][i]) for i in idx])
    if not rows:
        return None

    def draw() -> bytes:
        images = read_images()
        shape = next(iter(images.values())).shape
        grid = np.zeros((len(rows), GRID_PER_CLASS, *shape), np.uint8)
        for r, row in enumerate(ids):
            for k, sid in enumerate(row):
                grid[r, k] = images[sid]
        return fig.image_grid(grid, rows, caps)

    stat = images_file.stat()
    return _memo_png(ws, _digest("image_grid", rows, caps, ids, str(images_file.resolve()), stat.st_size, stat.st_mtime_ns), draw)


def build_report(ws: Path, project: Path | None = None) -> Path:
    """Write ``ws/reports/report.html`` and return its path; a clear error before any run."""
    from semiprune_core.data.manifest import IMAGES, read_images
    from semiprune_core.data.prepared import PREPARE_DIR

    table, meta = load_audit(ws)
    class_names = meta.get("class_names") or []
    audit = {name: column_array(table[name]) for name in table.column_names
             if name in ("sample_id", "target", "is_kept", "reason", "rank", "label_source", "pseudo_label",
                         "hidden_true_label") or name.endswith(("_aum", "_dual", "_el2n", "_forgetting"))}
    audit["reason"] = audit["reason"].astype(str)
    kept = audit["is_kept"].astype(bool)
    evaluate = read_metrics(ws / "metrics/evaluate.json")
    params = meta.get("params", {})
    s = params.get("select", {})
    page = fig.Page(f"semiprune report: {ws.name}")

    page.heading("Summary")
    acc = evaluate.get("test_accuracy")
    page.text(f"Strategy {s.get('strategy')} by {s.get('score')} at pruning ratio {s.get('ratio')}: kept {int(kept.sum()):,} "
              f"of {len(kept):,} pool samples. "
              + (f"A model trained on the coreset reached {acc:.2%} test accuracy ({evaluate.get('labels')} labels, "
                 f"{evaluate.get('labels_used'):,} labels used)." if isinstance(acc, float) else "No coreset evaluation yet."))
    page.table(["stage", "last run", "seconds", "sample passes"], cost_rows(ws))
    page.text("'restored' and 'unchanged' stages came from DVC's cache; their seconds are those of the run that made them.")

    sweep = (project or ws) / "reports" / "sweep" / "sweep.parquet"
    if sweep.exists():
        page.heading("Accuracy against pruning ratio")
        page.figure(_figure(ws, fig.accuracy_vs_ratio, read_parquet(sweep).to_pylist()),
                    f"final-epoch test accuracy of a model trained on each coreset ({sweep})")

    kind = str(s.get("score", "oos_aum")).partition("_")[2] or "aum"
    if f"oos_{kind}" in audit and f"ins_{kind}" in audit:
        page.heading("Scores: the unseen model against the models that saw each sample")
        page.figure(_figure(ws, fig.score_histograms, audit[f"oos_{kind}"].astype(float), audit[f"ins_{kind}"].astype(float), kind,
                            kept),
                    f"{kind}: out-of-sample (left) and in-sample (right), kept and pruned stacked")

    page.heading("Kept and pruned per class")
    targets = audit["target"].astype(int)
    k = np.bincount(targets[kept], minlength=len(class_names))
    p = np.bincount(targets[~kept], minlength=len(class_names))
    page.figure(_figure(ws, fig.class_counts, class_names, k, p), "samples per target class")
    page.table(["class", "kept", "pruned"], [[n, int(k[c]), int(p[c])] for c, n in enumerate(class_names)])

    pseudo = audit["label_source"].astype(str) == "pseudo"
    if "hidden_true_label" in audit and pseudo.any():  # the oracle and label-free baselines have none
        truth, guess = audit["hidden_true_label"][pseudo].astype(int), audit["pseudo_label"][pseudo].astype(int)
        matrix = np.zeros((len(class_names), len(class_names)), np.int64)
        np.add.at(matrix, (truth, guess), 1)
        page.heading("Pseudo-labels against the hidden true labels")
        page.figure(_figure(ws, fig.confusion, matrix, class_names),
                    f"{int(pseudo.sum()):,} pseudo-labeled samples; {float((truth == guess).mean()):.1%} correct")

    rank = audit["rank"].astype(np.int64)
    mislabeled = ~kept & np.array(["likely wrong label" in r for r in audit["reason"]])
    images_file = ws / PREPARE_DIR / IMAGES

    @functools.cache
    def grid_images() -> dict:
        wanted = set(audit["sample_id"][mislabeled]) | set(audit["sample_id"][kept])
        ids, imgs = read_images(images_file)
        return {sid: imgs[i] for i, sid in enumerate(ids) if sid in wanted}

    def hardest(mask):
        return lambda c: np.flatnonzero(mask & (targets == c))[np.argsort(-rank[mask & (targets == c)], kind="stable")]

    page.heading("Pruned as likely mislabeled")
    grid = _grid(ws, audit, class_names, hardest(mislabeled), images_file, grid_images) if mislabeled.any() else None
    if grid:
        page.figure(grid, f"per target class, the hardest {GRID_PER_CLASS} pruned by the cutoff rule "
                          "(captions: sample id; the true label where a benchmark knows it differs)")
    else:
        page.text(f"Strategy {s.get('strategy')} prunes nothing as likely mislabeled.")
    page.heading("Hardest samples kept")
    page.figure(_grid(ws, audit, class_names, hardest(kept), images_file, grid_images),
                f"per target class, the {GRID_PER_CLASS} kept samples ranked hardest")

    page.heading("Params")
    page.table(["section", "values"], [[k, json.dumps(v)] for k, v in params.items()])
    page.text(f"Code: {json.dumps(meta.get('code_version'))}. Inputs (SHA-256): {json.dumps(meta.get('inputs'))}.")
    out = ws / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(page.html(), encoding="utf-8")
    return out
