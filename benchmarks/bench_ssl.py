"""Pseudo-label quality of the SSL algorithms at the same wall-clock budget (a benchmark, not a test).

Fashion-MNIST, ``--per-class`` labels per class (default 100: 1,000 of 60,000), the same model
(``--model``, default ``fastcnn``) and the same training wall-clock budget for every algorithm. Each run's epoch count is
sized to the budget from a short real run of its own steps (200 steps, not counted) (a supervised step is ~15x cheaper than a
FixMatch step, so the baseline gets many more epochs), with ``max_seconds`` as a guard. Reports the
accuracy of the EMA model's pseudo-labels on the unlabeled pool (against the hidden true labels),
per class, the test accuracy, and the share of unlabeled samples above the threshold over training.

    python benchmarks/bench_ssl.py [--budget-seconds 600] [--algorithms supervised fixmatch flexmatch]
        [--variants standard longtail] [--json out.json]

``--epochs N`` skips the timing and trains every run for N epochs (a hyperparameter sweep on a faster
machine at the step count the budget buys on the target one); ``--device`` picks where to train.

Variants: ``standard``; ``longtail`` (imbalance factor 0.1 on the train split).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
from pathlib import Path

import numpy as np
import torch

import _checkout  # noqa: F401,E402  (first: this checkout's code, not the installed package's)
from semiprune_core.config import Data
from semiprune_core.data import build_pool
from semiprune_core.models import create_model
from semiprune_core.ssl import SemiSupervisedObjective, accuracy_report, make_policy, pseudo_labels
from semiprune_core.training import Schedule, evaluate, fit, predict

SEED = 0
VARIANTS = {"standard": {}, "longtail": {"long_tail": {"imbalance": 0.1}}}


def seconds_per_epoch(make_objective, model, batch_size: int, device: str, precision: str, *, steps: int = 200) -> float:
    """Seconds per epoch of a short real run (at least ``steps`` steps) on a throwaway copy of the model."""
    objective = make_objective()
    epochs = math.ceil(steps / objective.steps_per_epoch(batch_size))
    probe = fit(copy.deepcopy(model), objective, Schedule(epochs=epochs, batch_size=batch_size, lr=1e-3),
                seed=SEED + 1, device=device, precision=precision, desc="timing")
    return probe.train_seconds / epochs


def run(args, variant: str, algorithm: str) -> dict:
    cfg = Data.model_validate({"source": "fashion-mnist", "labeled": {"per_class": args.per_class}, **VARIANTS[variant]})
    pool = build_pool(cfg, seed=SEED, cache_dir=Path(".semiprune/cache"))
    train, test = pool.split == "train", pool.split == "test"
    lab = train & pool.flags["is_labeled"]
    unl = train & ~pool.flags["is_labeled"]

    def objective():  # a fresh one per use: threshold policies carry state
        policy = make_policy(algorithm, threshold=args.threshold, num_classes=len(pool.classes), n_unlabeled=int(unl.sum()))
        return SemiSupervisedObjective(
            pool.images[lab], pool.labels[lab], pool.images[unl] if policy is not None else pool.images[:0],
            policy=policy, mu=args.mu, lambda_u=args.lambda_u, confident_tau=args.threshold,
        )

    model = create_model(args.model, in_channels=1, num_classes=len(pool.classes), image_size=28, seed=SEED)
    if args.epochs:
        epochs, max_seconds = args.epochs, None
    else:
        per_epoch = seconds_per_epoch(objective, model, args.batch_size, args.device, args.precision)
        epochs, max_seconds = max(1, int(args.budget_seconds / per_epoch)), args.budget_seconds * 1.15
        logging.info("%s/%s: %.2f s per epoch estimated -> %d epochs", variant, algorithm, per_epoch, epochs)
    schedule = Schedule(epochs=epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=5e-4,
                        ema_decay=0.999, max_seconds=max_seconds)
    result = fit(model, objective(), schedule, seed=SEED, device=args.device, precision=args.precision,
                 desc=f"{variant}/{algorithm}")
    final = result.final_model
    probs = predict(final, pool.images[unl], output="probs").numpy()
    cols = pseudo_labels(probs, human_labels=np.full(int(unl.sum()), -1))
    report = accuracy_report(cols["pseudo_label"], cols["confidence"], pool.true_labels[unl], num_classes=len(pool.classes))
    return {
        "variant": variant,
        "algorithm": algorithm,
        "labeled": int(lab.sum()),
        "unlabeled": int(unl.sum()),
        "epochs": result.epochs_completed,
        "train_seconds": round(result.train_seconds, 1),
        "precision": result.precision,  # what "auto" resolved to
        "stopped_early": result.stopped_early,
        "sample_passes": result.sample_passes,
        "pseudo_label_accuracy": report["accuracy"],
        "per_class": {pool.classes[int(c)]: v["accuracy"] for c, v in report["per_class"].items()},
        "test_accuracy": evaluate(final, pool.images[test], pool.true_labels[test]),
        "confident_rate_by_epoch": [round(h.get("confident_rate", float("nan")), 4) for h in result.history],
        "mask_rate_by_epoch": [round(h.get("mask_rate", float("nan")), 4) for h in result.history],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=600)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--algorithms", nargs="+", default=["supervised", "fixmatch", "freematch"])
    parser.add_argument("--variants", nargs="+", default=["standard", "longtail"], choices=sorted(VARIANTS))
    parser.add_argument("--model", default="fastcnn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--lambda-u", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, help="fixed epochs per run instead of sizing to the budget")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rows = [run(args, v, a) for v in args.variants for a in args.algorithms]
    print(f"\nSSL pseudo-label accuracy on the unlabeled pool, {args.per_class} labels/class, "
          f"{f'{args.epochs} epochs' if args.epochs else f'budget {args.budget_seconds:.0f} s'} each, "
          f"threshold {args.threshold}, lambda_u {args.lambda_u}, mu {args.mu}, lr {args.lr}, on {args.device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{'variant':10} {'algorithm':11} {'epochs':>6} {'train s':>8} {'pseudo acc':>10} {'test acc':>8} {'confident (last)':>16}")
    for r in rows:
        print(f"{r['variant']:10} {r['algorithm']:11} {r['epochs']:6d} {r['train_seconds']:8.1f} "
              f"{r['pseudo_label_accuracy']:10.4f} {r['test_accuracy']:8.4f} {r['confident_rate_by_epoch'][-1]:16.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
