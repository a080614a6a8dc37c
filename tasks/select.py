"""select: the coreset at ``select.ratio`` by ``select.strategy``, with a reason for every sample.

Params: ``base``, ``select``. Outs: ``artifacts/select/selection.parquet`` (sample_id, is_kept, rank,
stratum, the score used, target, label_source, reason), ``artifacts/select/kept.txt`` (kept ids, one
per line), ``metrics/select.json``. Hidden true labels (benchmarks only) are read for the metrics alone.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from semiprune_core.errors import DataError
from semiprune_core.io import atomic_path, read_table, table_meta, write_json, write_table
from semiprune_core.seeding import rng
from semiprune_core.selection import hardness, select

from ._artifacts import KEPT, PSEUDO_LABELS, SCORES, SELECTION, SSL_MODEL, hidden_truth
from ._stage import StageContext, run_stage

METRICS = Path("metrics/select.json")


def _features(ctx: StageContext, sample_ids: np.ndarray) -> np.ndarray:
    """The SSL model's penultimate features of the train samples (prototypicality only)."""
    from semiprune_core.data.prepared import load_prepared
    from semiprune_core.models.saved import load_model
    from semiprune_core.training.engine import predict, resolve_device

    data = load_prepared()
    train = np.flatnonzero(data.split == "train")
    if not np.array_equal(data.sample_ids[train], sample_ids):
        raise DataError(f"{SCORES} and the manifest list different samples", "re-run the pipeline (dvc repro)")
    model, _ = load_model(SSL_MODEL, stage="ssl_train")
    return predict(model, data.images[train], device=resolve_device(ctx.params.base.device), output="features").numpy()


def select_stage(ctx: StageContext) -> None:
    base, s = ctx.params.base, ctx.params.select
    scores = read_table(SCORES, stage="scores")
    labels = read_table(PSEUDO_LABELS, columns=["sample_id", "target", "label_source"], stage="pseudo_label")
    sample_ids = scores["sample_id"].to_numpy(zero_copy_only=False)
    if not np.array_equal(labels["sample_id"].to_numpy(zero_copy_only=False), sample_ids):
        raise DataError(f"{SCORES} and {PSEUDO_LABELS} list different samples", "re-run the pipeline (dvc repro)")
    class_names = table_meta(labels).get("class_names")
    targets = labels["target"].to_numpy().astype(np.int64)
    label_source = labels["label_source"].to_numpy(zero_copy_only=False)
    if s.score not in scores.column_names:
        raise DataError(f"{SCORES} has no column {s.score!r}", "re-run the scores stage (dvc repro)")
    score = scores[s.score].to_numpy(zero_copy_only=False).astype(np.float64)
    options: dict = {"cutoff": s.cutoff, "strata": s.strata, "c_d": s.c_d}
    if s.strategy == "dual_beta":
        variant = s.score.split("_", 1)[0]
        if s.score != f"{variant}_dual":
            raise DataError(f"dual_beta ranks by DUAL, but select.score is {s.score!r}",
                            "set select.score to oos_dual or ins_dual")
        options |= {"dual": score, "prob_mean": scores[f"{variant}_target_prob_mean_T"].to_numpy()}
    if s.strategy == "prototypicality":
        options |= {"features": _features(ctx, sample_ids), "clusters": s.clusters or len(class_names)}
    sel = select(
        s.strategy, hardness=hardness(s.score, score), targets=targets, is_seed=label_source == "human",
        ratio=s.ratio, rng=rng(base.seed, "select"), keep_labeled=s.keep_labeled, class_balance=s.class_balance,
        min_per_class=s.min_per_class, class_names=class_names, **options,
    )
    table = pa.table({
        "sample_id": pa.array(sample_ids, pa.string()),
        "is_kept": pa.array(sel.is_kept),
        "rank": pa.array(sel.rank, pa.int64()),
        "stratum": pa.array(sel.stratum, pa.int32(), mask=sel.stratum < 0),
        s.score: pa.array(score, pa.float64()),
        "target": pa.array(targets, pa.int16()),
        "label_source": pa.array(label_source, pa.string()),
        "reason": pa.array(sel.reason.astype(str), pa.string()).dictionary_encode(),
    })
    meta = {"params": ctx.params.to_dict(), "class_names": class_names,
            "columns": {"rank": f"position from easiest (0) to hardest by {s.score}",
                        "stratum": "ccs: score stratum (0-based); prototypicality: k-means cluster; else null"}}
    write_table(SELECTION, table, meta=meta)
    with atomic_path(KEPT) as tmp:
        Path(tmp).write_text("".join(f"{i}\n" for i in sample_ids[sel.is_kept]), encoding="utf-8")
    write_json(METRICS, {**_metrics(sel, targets, class_names, sample_ids, s), "wall_time_s": round(ctx.elapsed(), 2)})


def _metrics(sel, targets: np.ndarray, class_names: list[str], sample_ids: np.ndarray, s) -> dict:
    kept = sel.is_kept
    out = {
        "strategy": s.strategy, "score": s.score, "ratio": s.ratio,
        "n_pool": int(len(kept)), "n_kept": int(kept.sum()), "n_pruned": int((~kept).sum()),
        "kept_per_class": {name: int((targets[kept] == c).sum()) for c, name in enumerate(class_names)},
        "reasons": dict(sorted(Counter(sel.reason.tolist()).items())),
    }
    found = hidden_truth(sample_ids, prefer="clean_label")
    if found is not None:  # a benchmark: how many wrong targets the coreset keeps (report only)
        column, truth = found
        wrong = targets != truth
        out["wrong_target"] = {"truth": column, "share_kept": float(wrong[kept].mean()),
                               "share_pruned": float(wrong[~kept].mean()) if (~kept).any() else None}
    return out


def main() -> int:
    return run_stage("select", select_stage)


if __name__ == "__main__":
    sys.exit(main())
