"""What out-of-sample scoring costs: K fold proxies against one proxy trained on the whole pool.

UNSEEN scores each sample with a proxy that never saw it: K proxies, proxy k trained on every fold
but k, each evaluating its held-out fold every epoch. In sample passes that is (K-1) trainings of
one proxy on the whole pool, plus one forward pass over the pool per epoch. This benchmark runs
both, as the pipeline runs them (the engine, the dynamics recorder, the same model and schedule, a
process that keeps freed memory like every stage process):

  one proxy   fit on all N samples for E epochs, recording in-sample dynamics (SemiPrune's scoring)
  K folds     fit on (K-1)/K of the pool each, recording in-sample dynamics and evaluating the
              held-out fold every epoch (the score@fold stage)
  early stop  the K folds with ``stop_after=T`` epochs of the same schedule (enough for DUAL over T)

and reports seconds, the ratio of the K folds to (K-1) one-proxy trainings, and how much of the
folds' time the held-out evaluation took. Fashion-MNIST's 60,000 training images with their true
labels as targets (the cost does not depend on which labels).

    python benchmarks/bench_folds.py [--k 2 4] [--epochs 10] [--stop-after 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkout  # noqa: F401,E402  (first: this checkout's code, not the installed package's)
from bench_engine import load_fashion  # noqa: E402

from semiprune_core import kernels  # noqa: E402
from semiprune_core.allocator import keep_freed_memory  # noqa: E402
from semiprune_core.data.folds import assign_folds  # noqa: E402
from semiprune_core.dynamics import DynamicsRecorder  # noqa: E402
from semiprune_core.models import create_model  # noqa: E402
from semiprune_core.training import Schedule, SupervisedObjective, fit  # noqa: E402

SEED = 0


class TimedRecorder(DynamicsRecorder):
    """The recorder, timing its epoch-end work (the held-out forward and the scratch write)."""

    eval_seconds = 0.0

    def on_epoch_end(self, epoch, model):
        t0 = time.perf_counter()
        super().on_epoch_end(epoch, model)
        self.eval_seconds += time.perf_counter() - t0


def train(args, images, targets, rows, held, scratch: Path, stop_after: int | None = None) -> dict:
    """One proxy on ``rows`` recording every sample's dynamics, ``held`` evaluated each epoch."""
    schedule = Schedule(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup=0.05, stop_after=stop_after)
    recorder = TimedRecorder(len(images), schedule.train_epochs, oos_rows=held, oos_images=images[held],
                             oos_targets=targets[held], scratch_dir=scratch, run_key=f"bench-{len(held)}-{held[:1]}",
                             precision=args.precision)
    model = create_model(args.model, in_channels=1, num_classes=10, image_size=28, seed=SEED)
    objective = SupervisedObjective(images[rows], targets[rows], ids=rows, view="weak")
    t0 = time.perf_counter()
    result = fit(model, objective, schedule, seed=SEED, device=args.device, precision=args.precision, hooks=[recorder],
                 desc=f"{len(rows)} samples")
    seconds = time.perf_counter() - t0
    recorder.cleanup()
    return {"seconds": seconds, "held_out_eval_seconds": recorder.eval_seconds, "epochs": result.epochs_completed,
            "precision": result.precision}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[2], help="fold counts to measure")
    p.add_argument("--model", default="fastcnn")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--stop-after", type=int, default=3, help="early-stop horizon T (0 = skip that part)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    kept = keep_freed_memory()  # as the score@fold stage process does: batch-1024 inference without it pays page faults
    x, y, _, _ = load_fashion()
    images, targets = x.numpy(), y.numpy()
    everyone, nobody = np.arange(len(images)), np.array([], np.int64)
    report: dict = {"machine": {"platform": platform.platform(), "cpu": kernels.cpu_model(), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "keeps_freed_memory": kept,
                                "native_kernels": kernels.available()},
                    "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "n": len(images)}
    with tempfile.TemporaryDirectory() as tmp:
        one = train(args, images, targets, everyone, nobody, Path(tmp) / "one")
        report["one_proxy"] = one
        print(f"one proxy on all {len(images):,} samples, {args.epochs} epochs: {one['seconds']:.1f} s", flush=True)
        for k in args.k:
            folds = assign_folds(targets, k=k, seed=SEED)
            for label, stop in (("full", None), ("early_stop", args.stop_after or None)):
                if label == "early_stop" and stop is None:
                    continue
                runs = [train(args, images, targets, np.flatnonzero(folds != j), np.flatnonzero(folds == j),
                              Path(tmp) / f"k{k}_{j}", stop) for j in range(k)]
                total = sum(r["seconds"] for r in runs)
                evals = sum(r["held_out_eval_seconds"] for r in runs)
                row = {"k": k, "stop_after": stop, "folds": runs, "seconds": total, "held_out_eval_seconds": evals,
                       "ratio_to_k_minus_1_proxies": total / ((k - 1) * one["seconds"])}
                report[f"k{k}_{label}"] = row
                print(f"K={k} folds{'' if stop is None else f', stop after {stop} of {args.epochs} epochs'}: {total:.1f} s "
                      f"= {row['ratio_to_k_minus_1_proxies']:.3f} x (K-1) one-proxy trainings; held-out evaluation "
                      f"{evals:.1f} s ({evals / total:.0%} of it)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
