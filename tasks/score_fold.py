"""score@fold: train proxy k on every fold but k, recording every sample's dynamics each epoch.

Out-of-sample for fold k (an eval-mode forward on un-augmented images), in-sample for the rest
(from the training forward itself). Params: ``base``, ``cv``, ``proxy``.
Outs: ``artifacts/dynamics/fold_<k>.parquet``, ``metrics/score_fold_<k>.json``.
Usage: ``python -m tasks.score_fold K``.
"""

from __future__ import annotations

import sys

import numpy as np

from semiprune_core.data.folds import assign_folds
from semiprune_core.data.prepared import PREPARE_DIR, load_prepared
from semiprune_core.dynamics import DynamicsRecorder
from semiprune_core.errors import ConfigError
from semiprune_core.io import write_json
from semiprune_core.models import create_model
from semiprune_core.seeding import stream_seed
from semiprune_core.training.engine import Schedule, SupervisedObjective, fit

from ._artifacts import PSEUDO_LABELS, dynamics_path, load_targets
from ._stage import StageContext, run_stage

def score_fold(ctx: StageContext, k: int) -> None:
    base, cv, px = ctx.params.base, ctx.params.cv, ctx.params.proxy
    if k not in cv.folds:
        raise ConfigError(f"fold {k} is not one of cv.folds {cv.folds}", "run score@<fold> for a listed fold")
    data = load_prepared()
    train, targets, _ = load_targets(data)
    images = data.images[train]
    folds = assign_folds(targets, k=cv.k, seed=cv.seed, classes=data.classes)
    fit_rows, held = np.flatnonzero(folds != k), np.flatnonzero(folds == k)

    run_key = ctx.run_key(PREPARE_DIR / "manifest.parquet", PSEUDO_LABELS, extra=k)
    c, h, _ = data.image_shape
    model = create_model(px.model, in_channels=c, num_classes=data.num_classes, image_size=h,
                         seed=stream_seed(base.seed, "proxy", k))
    schedule = Schedule(epochs=px.epochs, batch_size=px.batch_size, lr=px.lr, momentum=px.momentum,
                        nesterov=px.momentum > 0, weight_decay=px.weight_decay, warmup=px.warmup,
                        stop_after=px.stop_after)
    recorder = DynamicsRecorder(len(train), schedule.train_epochs, oos_rows=held, oos_images=images[held],
                                oos_targets=targets[held], scratch_dir=ctx.scratch, run_key=run_key,
                                precision=base.precision)
    objective = SupervisedObjective(images[fit_rows], targets[fit_rows], ids=fit_rows, view=px.view,
                                    label_smoothing=px.label_smoothing)
    result = fit(model, objective, schedule, seed=stream_seed(base.seed, "proxy", k), device=base.device, precision=base.precision,
                 compile=base.compile, hooks=[recorder], checkpoint_dir=ctx.scratch, run_key=run_key, keep_checkpoint=True,
                 desc=f"score@{k}")
    out = dynamics_path(k)
    recorder.write_parquet(out, data.sample_ids[train], fold=folds,
                           meta={"held_out_fold": k, "schedule_epochs": px.epochs, "params": ctx.params.to_dict()})
    recorder.cleanup()
    (ctx.scratch / "checkpoint.pt").unlink(missing_ok=True)
    write_json(f"metrics/score_fold_{k}.json", {
        "fold": k,
        "n_train": int(len(fit_rows)),
        "n_held_out": int(len(held)),
        "epochs": result.epochs_completed,
        "schedule_epochs": px.epochs,
        "precision": result.precision,
        "resumed_from_epoch": result.start_epoch if result.resumed else None,
        "train_seconds": round(result.train_seconds, 2),
        "wall_time_s": round(ctx.elapsed(), 2),
        # training passes + one eval pass over the held-out fold per epoch
        "sample_passes": int(result.sample_passes + len(held) * result.epochs_completed),
        "final_train_accuracy": result.history[-1]["acc"],
    })


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("error: usage: python -m tasks.score_fold FOLD (a fold id from cv.folds)", file=sys.stderr)
        return 2
    k = int(argv[0])
    return run_stage(f"score@{k}", lambda ctx: score_fold(ctx, k))


if __name__ == "__main__":
    sys.exit(main())
