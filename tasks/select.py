"""select: the coreset at ``select.ratio`` by ``select.strategy``, with a reason for every sample.

Params: ``base``, ``select``. Outs: ``artifacts/select/selection.parquet`` (sample_id, is_kept, rank,
stratum, the score used, target, label_source, reason), ``artifacts/select/kept.txt`` (kept ids, one
per line), ``metrics/select.json``. Hidden true labels (benchmarks only) are read for the metrics alone.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from semiprune_core.errors import DataError
from semiprune_core.io import atomic_path, column_array, read_table, table_meta, write_json, write_table
from semiprune_core.seeding import rng
from semiprune_core.selection import hardness, select
from semiprune_core.selection.multistep import multistep_select

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
    return predict(model, data.images[train], device=resolve_device(ctx.params.base.device),
                   precision=ctx.params.base.precision, output="features").numpy()


def _step_scorer(ctx: StageContext, sample_ids: np.ndarray, targets: np.ndarray, cost: list[dict]):
    """unseen_multistep's scorer: a proxy trained on the coreset so far, judging every other sample
    each epoch (out of sample); returns their hardness by ``select.score`` and its error per class."""
    from semiprune_core.data.prepared import load_prepared
    from semiprune_core.dynamics import DynamicsRecorder
    from semiprune_core.models import create_model
    from semiprune_core.scoring import compute_scores
    from semiprune_core.seeding import stream_seed
    from semiprune_core.training.engine import Schedule, SupervisedObjective, fit

    base, px, sc, s = ctx.params.base, ctx.params.proxy, ctx.params.scores, ctx.params.select
    data = load_prepared()
    train = np.flatnonzero(data.split == "train")
    if not np.array_equal(data.sample_ids[train], sample_ids):
        raise DataError(f"{SCORES} and the manifest list different samples", "re-run the pipeline (dvc repro)")
    images = data.images[train]
    epochs = s.step_epochs or px.epochs
    kind = s.score.partition("_")[2]
    c, h, _ = data.image_shape

    def scorer(step: int, coreset: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_fit = len(coreset)
        seed = stream_seed(base.seed, "multistep", step)
        model = create_model(px.model, in_channels=c, num_classes=data.num_classes, image_size=h, seed=seed)
        schedule = Schedule(epochs=epochs, batch_size=px.batch_size, lr=px.lr, momentum=px.momentum,
                            nesterov=px.momentum > 0, weight_decay=px.weight_decay, warmup=px.warmup)
        held = np.arange(n_fit, n_fit + len(candidates))
        recorder = DynamicsRecorder(n_fit + len(candidates), epochs, oos_rows=held, oos_images=images[candidates],
                                    oos_targets=targets[candidates], scratch_dir=ctx.scratch / f"step_{step}", precision=base.precision,
                                    run_key=ctx.run_key(extra=["multistep", step, hashlib.sha256(coreset.tobytes()).hexdigest()]))
        objective = SupervisedObjective(images[coreset], targets[coreset], ids=np.arange(n_fit), view=px.view,
                                        label_smoothing=px.label_smoothing)
        result = fit(model, objective, schedule, seed=seed, device=base.device, precision=base.precision,
                     compile=base.compile, hooks=[recorder],
                     desc=f"select step {step}")
        traj = recorder.trajectories(held)
        recorder.cleanup()
        scores = compute_scores(traj, window=min(sc.window, epochs), first_dual=min(sc.first_dual, epochs),
                                first_el2n=min(sc.first_el2n, epochs))
        wrong = traj["correct"][:, -1] < 0.5
        per_class = np.bincount(targets[candidates], weights=wrong, minlength=data.num_classes)
        error = per_class / np.maximum(np.bincount(targets[candidates], minlength=data.num_classes), 1)
        cost.append({"step": step, "coreset": n_fit, "candidates": int(len(candidates)), "epochs": result.epochs_completed,
                     "train_seconds": round(result.train_seconds, 2),
                     "sample_passes": int(result.sample_passes + len(candidates) * result.epochs_completed),
                     "heldout_error": round(float(wrong.mean()), 4)})
        ctx.log.info("select step %d: scorer trained on %d, %.1f%% wrong on the %d others", step, n_fit,
                     100 * wrong.mean(), len(candidates))
        return hardness(s.score, scores[kind]), error

    return scorer


def select_stage(ctx: StageContext) -> None:
    base, s = ctx.params.base, ctx.params.select
    scores = read_table(SCORES, stage="scores")
    labels = read_table(PSEUDO_LABELS, columns=["sample_id", "target", "label_source"], stage="pseudo_label")
    sample_ids = column_array(scores["sample_id"])
    if not np.array_equal(column_array(labels["sample_id"]), sample_ids):
        raise DataError(f"{SCORES} and {PSEUDO_LABELS} list different samples", "re-run the pipeline (dvc repro)")
    class_names = table_meta(labels).get("class_names")
    targets = labels["target"].to_numpy().astype(np.int64)
    label_source = column_array(labels["label_source"])
    if s.score not in scores.column_names:
        raise DataError(f"{SCORES} has no column {s.score!r}", "re-run the scores stage (dvc repro)")
    score = column_array(scores[s.score]).astype(np.float64)
    options: dict = {"cutoff": s.cutoff_value, "strata": s.strata, "c_d": s.c_d}
    if s.strategy == "dual_beta":
        variant = s.score.split("_", 1)[0]
        if s.score != f"{variant}_dual":
            raise DataError(f"dual_beta ranks by DUAL, but select.score is {s.score!r}",
                            "set select.score to oos_dual or ins_dual")
        options |= {"dual": score, "prob_mean": scores[f"{variant}_target_prob_mean_T"].to_numpy()}
    if s.strategy == "prototypicality":
        options |= {"features": _features(ctx, sample_ids), "clusters": s.clusters or len(class_names)}
    cost: list[dict] = []
    if s.strategy == "unseen_multistep":
        if s.class_balance or s.min_per_class:
            raise DataError("unseen_multistep does not take class_balance or min_per_class",
                            "use select.class_aware for per-class step quotas")
        sel = multistep_select(
            base=s.step_strategy, steps=s.steps, hardness=hardness(s.score, score), targets=targets,
            is_seed=label_source == "human", ratio=s.ratio, rng=rng(base.seed, "select"), keep_labeled=s.keep_labeled,
            class_aware=s.class_aware, num_classes=len(class_names), scorer=_step_scorer(ctx, sample_ids, targets, cost),
            cutoff=s.cutoff_value, strata=s.strata)
    else:
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
    out = _metrics(sel, targets, class_names, sample_ids, s)
    if cost:  # the models multi-step selection trained: its compute, step by step
        out["multistep"] = {"steps": cost, "train_seconds": round(sum(c["train_seconds"] for c in cost), 2),
                            "sample_passes": sum(c["sample_passes"] for c in cost)}
        out["sample_passes"] = out["multistep"]["sample_passes"]
    write_json(METRICS, {**out, "wall_time_s": round(ctx.elapsed(), 2)})


def _metrics(sel, targets: np.ndarray, class_names: list[str], sample_ids: np.ndarray, s) -> dict:
    kept = sel.is_kept
    out = {
        "strategy": s.strategy, "score": s.score, "ratio": s.ratio, "cutoff": s.cutoff_value,
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
