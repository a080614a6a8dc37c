"""Scoring and selection at ImageNet-1K size: fold dynamics of 1,281,167 samples x 60 epochs (a benchmark, not a test).

Writes K synthetic fold dynamics files with the real writer (:func:`write_dynamics`, via the same
(E, N, 6) float16 memmap layout the recorder streams to), then measures, each in a fresh process so
its peak RSS is its own:
  - :func:`combine_folds` alone (reads each file and runs :func:`compute_scores` on it), with a
    breakdown of reading one file vs scoring it;
  - the real ``scores`` and ``select`` stages (``python -m tasks.scores``, ``python -m tasks.select``
    for each ``--strategies``) in a workspace holding those files, pseudo-labels and hidden true labels,
    as DVC would run them: wall seconds and peak RSS of each stage's process (``wait4``).
Also storage in bytes per sample-epoch (file size / (N x E)) and, as a sanity check on the synthetic
data, the spread of in-sample vs out-of-sample AUM and how well each finds the mislabeled samples.

    python benchmarks/bench_scores.py [--samples 1281167] [--epochs 60] [--folds 2] [--json out.json]

Synthetic dynamics: C classes, 10% of targets flipped to another class ("mislabeled"); the logits of
epoch t have Gaussian noise, a signal for the true class that grows with t (weaker for "hard"
samples), and, for in-sample rows only, a memorisation term for the target label that grows late in
training (so in-sample scores of mislabeled samples look learned, as UNSEEN describes). The
statistics are computed with the recorder's own :func:`per_sample_stats`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _checkout  # noqa: F401,E402  (first: this checkout's code, not the installed package's)
import numpy as np

HERE = Path(__file__).resolve()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def generate(args) -> dict:
    import pyarrow as pa
    import torch

    from semiprune_core.data.folds import assign_folds
    from semiprune_core.dynamics import METRICS, per_sample_stats, write_dynamics
    from semiprune_core.io import write_table
    from semiprune_core.seeding import rng

    torch.set_num_threads(args.threads)
    n, e, c, k = args.samples, args.epochs, args.classes, args.folds
    work = Path(args.dir)
    g = rng(args.seed, "bench_scores", "pool")
    true = g.integers(c, size=n)
    noisy = g.random(n) < args.noise
    target = np.where(noisy, (true + g.integers(1, c, size=n)) % c, true)
    hardness = np.exp(-0.5 * g.normal(size=n)).astype(np.float32)
    ids = np.array([f"train/{i:07d}" for i in g.permutation(n)], dtype=object)
    fold = assign_folds(target, k=k, seed=args.seed)
    write_table(work / "truth.parquet", pa.table({"sample_id": ids, "is_noisy": noisy}))
    # what the pipeline would have before `scores`: the targets, and (benchmarks) the true labels
    classes = [f"class{c}" for c in range(c)]
    write_table(work / "pseudo_labels.parquet", pa.table({
        "sample_id": ids, "target": pa.array(target, pa.int16()),
        "label_source": np.where(g.random(n) < 0.01, "human", "pseudo"),
    }), meta={"class_names": classes})
    write_table(work / "hidden_labels.parquet", pa.table({"sample_id": ids, "true_label": pa.array(true, pa.int16())}))
    rows = np.arange(n)
    t_target = torch.from_numpy(target)
    timings = {"simulate_s": 0.0, "write_s": 0.0}
    files = []
    for j in range(k):
        t0 = time.perf_counter()
        scratch = np.lib.format.open_memmap(work / f"scratch_{j}.npy", mode="w+", dtype=np.float16, shape=(e, n, len(METRICS)))
        in_sample = (fold != j).astype(np.float32)
        for t in range(e):
            progress = (t + 1) / e
            z = rng(args.seed, "bench_scores", j, t).standard_normal((n, c), dtype=np.float32)
            z[rows, true] += 4.0 * progress * hardness
            z[rows, target] += 8.0 * progress**2 * in_sample
            for start in range(0, n, 262_144):
                s = slice(start, start + 262_144)
                stats = per_sample_stats(torch.from_numpy(z[s]), t_target[s])
                scratch[t, s] = torch.stack([stats[m].float() for m in METRICS], 1).numpy()
            scratch.flush()
        t1 = time.perf_counter()
        path = work / f"fold_{j}.parquet"
        write_dynamics(path, ids, fold=fold, is_oos=fold == j, values=scratch, meta={"held_out_fold": j, "synthetic": True})
        t2 = time.perf_counter()
        del scratch
        (work / f"scratch_{j}.npy").unlink()
        timings["simulate_s"] += t1 - t0
        timings["write_s"] += t2 - t1
        files.append(str(path))
    return {**timings, "files": files, "peak_rss_mib": rss_mib()}


def score(args) -> dict:
    base = rss_mib()
    import pyarrow  # noqa: F401  (imported before the baseline is taken, like numpy)

    from semiprune_core.dynamics import read_dynamics
    from semiprune_core.io import read_table
    from semiprune_core.scoring import (
        auroc,
        combine_folds,
        compute_scores,
        spread_summary,
    )

    imported = rss_mib()
    files = sorted(Path(args.dir).glob("fold_*.parquet"))
    opts = {"window": args.window, "first_dual": args.first_dual, "first_el2n": args.first_el2n}
    t0 = time.perf_counter()
    out = combine_folds(files, **opts)
    wall = time.perf_counter() - t0
    peak = rss_mib()

    truth = read_table(Path(args.dir) / "truth.parquet")
    assert truth.column("sample_id").to_numpy().tolist() == out["sample_id"].tolist()
    noisy = truth.column("is_noisy").to_numpy()
    quality = {
        "spread": {name: spread_summary(out[name]) for name in ("oos_aum", "ins_aum", "oos_dual", "ins_dual")},
        "auroc_mislabeled": {name: auroc(-out[name], noisy) for name in ("oos_aum", "ins_aum")},
    }
    del out
    # breakdown (after the peak was taken): reading one file vs scoring it
    t0 = time.perf_counter()
    dyn = read_dynamics(files[0])
    t1 = time.perf_counter()
    compute_scores(dyn, **opts)
    t2 = time.perf_counter()
    return {"combine_s": wall, "read_one_file_s": t1 - t0, "compute_scores_one_file_s": t2 - t1,
            "peak_rss_mib": peak, "rss_after_python_numpy_mib": base, "rss_after_imports_mib": imported, **quality}


def stages(args) -> dict:
    """The scores stage, then the select stage once per strategy, as DVC runs them, in a workspace."""
    import yaml

    repo, work = HERE.parent.parent, Path(args.dir)
    ws = work / "workspace"
    for sub in ("dynamics", "pseudo", "prepare", "scores", "select"):
        (ws / "artifacts" / sub).mkdir(parents=True, exist_ok=True)
    for j in range(args.folds):
        (work / f"fold_{j}.parquet").rename(ws / f"artifacts/dynamics/fold_{j}.parquet")
    (work / "pseudo_labels.parquet").rename(ws / "artifacts/pseudo/pseudo_labels.parquet")
    (work / "hidden_labels.parquet").rename(ws / "artifacts/prepare/hidden_labels.parquet")
    shutil.copy(repo / "dvc.yaml", ws / "dvc.yaml")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["base"]["threads"] = args.threads
    params["cv"].update(k=args.folds, folds=list(range(args.folds)))
    params["scores"].update(window=args.window, first_dual=args.first_dual, first_el2n=args.first_el2n)
    env = {**os.environ, "PYTHONPATH": str(repo), "SEMIPRUNE_LOG_LEVEL": "WARNING"}

    def run(module: str) -> dict:
        (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", module], cwd=ws, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{module} failed ({os.waitstatus_to_exitcode(status)})")
        return {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}

    out = {"scores": run("tasks.scores"), "select": {}}
    for strategy in args.strategies:
        params["select"].update(strategy=strategy, score="oos_dual" if strategy == "dual_beta" else "oos_aum")
        out["select"][strategy] = run("tasks.select")
    return out


def child(args, phase: str) -> dict:
    cmd = [sys.executable, str(HERE), "--phase", phase, *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{phase} phase failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1_281_167, help="pool size (default: ImageNet-1K's train set)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.1, help="fraction of mislabeled targets")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--first-dual", type=int, default=30)
    p.add_argument("--first-el2n", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategies", nargs="+", default=["random", "aum_cutoff", "ccs", "dual_beta"],
                   help="select strategies to time (each a run of the select stage)")
    p.add_argument("--dir", help="working folder (default: a temp dir, deleted after)")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--phase", choices=["generate", "score", "stages"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.phase:  # a child process: one phase, JSON on the last stdout line
        print(json.dumps({"generate": generate, "score": score, "stages": stages}[args.phase](args)))
        return 0

    owned = args.dir is None
    if owned:
        args.dir = tempfile.mkdtemp(prefix="bench_scores_")
        sys.argv += ["--dir", args.dir]
    try:
        gen = child(args, "generate")
        sizes = [Path(f).stat().st_size for f in gen["files"]]
        res = child(args, "score")
        staged = child(args, "stages")
    finally:
        if owned:
            shutil.rmtree(args.dir, ignore_errors=True)
    n, e = args.samples, args.epochs
    report = {
        "samples": n, "epochs": e, "folds": args.folds, "classes": args.classes,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "storage_bytes_per_sample_epoch": [round(s / (n * e), 3) for s in sizes],
        "file_mib": [round(s / 2**20, 1) for s in sizes],
        "scratch_bytes_per_sample_epoch": 12,
        "generate": {k: v for k, v in gen.items() if k != "files"},
        "score": res,
        "stages": staged,
    }
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
