"""evaluate: train a fresh model on the coreset alone and measure it on the test split.

Targets are what annotating the coreset would give (``evaluate.labels: annotation``): the dataset's
true label where it has one (benchmarks), else the pipeline's target label; ``labels: target`` always
uses the target. Params: ``base``, ``evaluate``. Outs: ``metrics/evaluate.json``,
``plots/evaluate_history.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from semiprune_core.data.prepared import load_prepared
from semiprune_core.errors import DataError
from semiprune_core.io import read_table, write_json
from semiprune_core.models import create_model
from semiprune_core.seeding import stream_seed
from semiprune_core.training.engine import Schedule, SupervisedObjective, fit, predict

from ._artifacts import PSEUDO_LABELS, SELECTION, hidden_truth, load_targets, write_history
from ._stage import StageContext, run_stage

METRICS = Path("metrics/evaluate.json")
HISTORY = Path("plots/evaluate_history.csv")


def evaluate_stage(ctx: StageContext) -> None:
    base, e = ctx.params.base, ctx.params.evaluate
    data = load_prepared()
    train, targets, is_seed = load_targets(data)
    selection = read_table(SELECTION, columns=["sample_id", "is_kept"], stage="select")
    if not np.array_equal(selection["sample_id"].to_numpy(zero_copy_only=False), data.sample_ids[train]):
        raise DataError(f"{SELECTION} does not list the manifest's train samples", "re-run select (dvc repro)")
    kept = selection["is_kept"].to_numpy(zero_copy_only=False).astype(bool)

    source = "target"
    labels = targets
    if e.labels == "annotation":
        found = hidden_truth(data.sample_ids[train])
        if found is not None:  # what a labeler would give the coreset: the dataset's own label
            source, labels = found[0], np.where(is_seed, targets, found[1])
    test = data.rows("test")
    has_test = len(test) > 0 and bool((data.labels[test] >= 0).all())
    if not has_test:
        ctx.log.warning("no labeled test split: the coreset model is trained but cannot be measured")

    rows = np.flatnonzero(kept)
    c, h, _ = data.image_shape
    seed = stream_seed(base.seed, "evaluate")
    model = create_model(e.model, in_channels=c, num_classes=data.num_classes, image_size=h, seed=seed)
    schedule = Schedule(epochs=e.epochs, batch_size=e.batch_size, lr=e.lr, momentum=e.momentum,
                        nesterov=e.momentum > 0, weight_decay=e.weight_decay, warmup=e.warmup)
    objective = SupervisedObjective(data.images[train[rows]], labels[rows], view=e.view, label_smoothing=e.label_smoothing)
    result = fit(model, objective, schedule, seed=seed, device=base.device, precision=base.precision,
                 compile=base.compile, checkpoint_dir=ctx.scratch,
                 run_key=ctx.run_key(SELECTION, PSEUDO_LABELS, extra=source), desc="evaluate")

    out = {
        "coreset_size": int(len(rows)),
        "pool_size": int(len(kept)),
        "labels": source,
        "labels_used": int((kept | is_seed).sum()),
        "epochs": result.epochs_completed,
        "precision": result.precision,
        "resumed_from_epoch": result.start_epoch if result.resumed else None,
        "train_seconds": round(result.train_seconds, 2),
        "sample_passes": int(result.sample_passes + (len(test) if has_test else 0)),
        "final_train_accuracy": result.history[-1]["acc"],
        "test_accuracy": None,
        "per_class_accuracy": None,
    }
    if has_test:
        pred = predict(result.final_model, data.images[test], precision=base.precision, output="logits").argmax(1).numpy()
        truth = data.labels[test]
        out["test_accuracy"] = float((pred == truth).mean())
        out["per_class_accuracy"] = {name: float((pred[truth == k] == k).mean()) if (truth == k).any() else None
                                     for k, name in enumerate(data.classes)}
    write_history(HISTORY, result.history, ["epoch", "loss", "acc", "lr", "seconds", "img_per_s"])
    write_json(METRICS, {**out, "wall_time_s": round(ctx.elapsed(), 2)})


def main() -> int:
    return run_stage("evaluate", evaluate_stage)


if __name__ == "__main__":
    sys.exit(main())
