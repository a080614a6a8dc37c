"""ssl_train: train the labeling model on the labeled subset and the unlabeled pool.

Params: ``base``, ``ssl``. Outs: ``artifacts/ssl/model.pt`` (the EMA model), ``metrics/ssl.json``,
``plots/ssl_history.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from semiprune_core.data.prepared import PREPARE_DIR, load_prepared
from semiprune_core.errors import DataError
from semiprune_core.io import write_json
from semiprune_core.models import create_model
from semiprune_core.models.saved import ModelSpec, save_model
from semiprune_core.ssl import SemiSupervisedObjective, make_policy
from semiprune_core.training.engine import Schedule, evaluate, fit

from ._artifacts import SSL_MODEL, write_history
from ._stage import StageContext, run_stage

METRICS = Path("metrics/ssl.json")
HISTORY = Path("plots/ssl_history.csv")


def check_labeled_subset(labels: np.ndarray, n_pool: int, classes: list[str]) -> None:
    """Every class needs labeled samples, and the labeled subset must be a proper part of the pool."""
    if len(labels) == 0:
        raise DataError("the pool has no labeled samples", "set data.labeled (e.g. per_class: 100) and re-run prepare")
    missing = [classes[c] for c in range(len(classes)) if not (labels == c).any()]
    if missing:
        raise DataError(f"class {missing[0]!r} has no labeled sample" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                        "label at least one sample of every class")
    if len(labels) > n_pool:
        raise DataError(f"the labeled subset ({len(labels)}) is larger than the train pool ({n_pool})", "re-run prepare")


def ssl_train(ctx: StageContext) -> None:
    base, s = ctx.params.base, ctx.params.ssl
    data = load_prepared()
    train = data.split == "train"
    lab, unl = train & data.is_labeled, train & ~data.is_labeled
    check_labeled_subset(data.labels[lab], int(train.sum()), data.classes)
    policy = make_policy(s.algorithm, threshold=s.threshold, num_classes=data.num_classes,
                         n_unlabeled=int(unl.sum()), freematch_momentum=s.freematch_momentum)
    objective = SemiSupervisedObjective(
        data.images[lab], data.labels[lab], data.images[unl] if policy is not None else data.images[:0],
        policy=policy, mu=s.mu, lambda_u=s.lambda_u, confident_tau=s.threshold,
    )
    if policy is not None and not objective.uses_unlabeled:
        ctx.log.warning("the pool has no unlabeled samples: %s trains on the labeled subset alone", s.algorithm)
    c, h, _ = data.image_shape
    spec = ModelSpec(s.model, in_channels=c, num_classes=data.num_classes, image_size=h)
    model = create_model(spec.name, in_channels=c, num_classes=spec.num_classes, image_size=h, seed=base.seed)
    schedule = Schedule(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, momentum=s.momentum,
                        nesterov=s.momentum > 0, weight_decay=s.weight_decay, warmup=s.warmup,
                        ema_decay=s.ema_decay, max_seconds=s.max_seconds)
    run_key = ctx.run_key(PREPARE_DIR / "manifest.parquet")
    result = fit(model, objective, schedule, seed=base.seed, device=base.device, precision=base.precision,
                 compile=base.compile, checkpoint_dir=ctx.scratch, run_key=run_key, desc=f"ssl_train[{s.algorithm}]")
    final = result.final_model

    test = data.split == "test"
    has_test = bool(test.any() and (data.labels[test] >= 0).all())
    test_acc = evaluate(final, data.images[test], data.labels[test], precision=base.precision) if has_test else None
    if not has_test:
        ctx.log.warning("no labeled test split: cannot measure the SSL model's accuracy")
    steps = objective.steps_per_epoch(s.batch_size)
    save_model(SSL_MODEL, final, spec)
    write_history(HISTORY, result.history, ["epoch", "loss", "acc", "lr", "seconds", "img_per_s", "loss_labeled",
                                            "loss_unlabeled", "mask_rate", "confident_rate"])
    write_json(METRICS, {
        "algorithm": s.algorithm,
        "labeled": int(lab.sum()),
        "unlabeled": int(unl.sum()) if policy is not None else 0,
        "epochs": result.epochs_completed,
        "steps": steps * result.epochs_completed,
        "stopped_early": result.stopped_early,
        "precision": result.precision,
        "resumed_from_epoch": result.start_epoch if result.resumed else None,
        "train_seconds": round(result.train_seconds, 2),
        "wall_time_s": round(ctx.elapsed(), 2),
        "sample_passes": int(result.sample_passes),
        "test_accuracy": test_acc,
        "final_mask_rate": result.history[-1].get("mask_rate"),
        "final_confident_rate": result.history[-1].get("confident_rate"),
    })


def main() -> int:
    return run_stage("ssl_train", ssl_train)


if __name__ == "__main__":
    sys.exit(main())
