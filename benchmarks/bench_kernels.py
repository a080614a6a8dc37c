"""The native CPU kernels against torch's, alternated in one process (this machine is noisy).

(a) ``fastcnn``'s 2x2 max-pools alone, at the shapes training meets (bf16 and fp32, channels_last):
    forward + backward through autograd, and the inference forward (the native kernel against the
    strided-view maximum used where it does not apply); median of ``--reps`` calls each.
(b) One epoch of the engine on Fashion-MNIST per model and batch (``--train fastcnn:960 ...``, bf16),
    with and without the kernels, alternated ``--rounds`` times (on, off, off, on, ...); the median
    images per second of each.

    python benchmarks/bench_kernels.py [--train fastcnn:960 fastcnn:256 fastcnn_s:256 fastcnn_l:256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkout  # noqa: F401,E402  (first: this checkout's code, not the installed package's)
from bench_engine import load_fashion  # noqa: E402

from semiprune_core import kernels  # noqa: E402
from semiprune_core.allocator import keep_freed_memory  # noqa: E402
from semiprune_core.kernels import maxpool2  # noqa: E402
from semiprune_core.models import create_model  # noqa: E402
from semiprune_core.models.fastcnn import MaxPool2  # noqa: E402
from semiprune_core.training import Schedule, SupervisedObjective, fit  # noqa: E402

POOL_SHAPES = [(960, 16, 28, 28), (960, 32, 14, 14), (960, 64, 7, 7), (256, 16, 28, 28), (256, 16, 14, 14), (256, 32, 7, 7)]
NATIVE_APPLIES = maxpool2.applies


def use_native(on: bool) -> None:
    maxpool2.applies = NATIVE_APPLIES if on else (lambda x: False)


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def pools(reps: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for shape in POOL_SHAPES:
            x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype).contiguous(memory_format=torch.channels_last)
            row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
            for on in (True, False):
                use_native(on)
                name = "native" if on else "torch"
                row[f"train_ms_{name}"] = median_ms(lambda: torch.autograd.grad(MaxPool2()(x), x, grad), reps)
                with torch.no_grad():
                    row[f"infer_ms_{name}"] = median_ms(lambda: MaxPool2()(x), reps)
            use_native(True)
            rows.append(row)
            print(f"{row['dtype']:>8} {str(tuple(shape)):>18}: forward+backward {row['train_ms_torch']:.3f} -> "
                  f"{row['train_ms_native']:.3f} ms ({row['train_ms_torch'] / row['train_ms_native']:.2f}x); inference "
                  f"{row['infer_ms_torch']:.3f} -> {row['infer_ms_native']:.3f} ms ({row['infer_ms_torch'] / row['infer_ms_native']:.2f}x)",
                  flush=True)
    return rows


def training(specs: list[str], rounds: int) -> list[dict]:
    x, y, _, _ = load_fashion()
    rows = []
    for spec in specs:
        name, batch = spec.split(":")
        batch = int(batch)
        n = min(len(x), batch * (20 if batch >= 512 else 60))  # one epoch of 20-60 steps
        rates: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds):
            for on in (True, False) if r % 2 == 0 else (False, True):
                use_native(on)
                model = create_model(name, in_channels=1, num_classes=10, image_size=28, seed=0)
                objective = SupervisedObjective(x[:n], y[:n], view="weak")
                t0 = time.perf_counter()
                fit(model, objective, Schedule(epochs=1, batch_size=batch, lr=0.1, warmup=0.05), seed=0, device="cpu", precision="bf16")
                rates[on].append(n / (time.perf_counter() - t0))
        use_native(True)
        native, plain = statistics.median(rates[True]), statistics.median(rates[False])
        rows.append({"model": name, "batch_size": batch, "images": n, "rounds": rounds,
                     "img_per_s_native": native, "img_per_s_torch": plain, "speedup": native / plain})
        print(f"{name} batch {batch}: {plain:,.0f} -> {native:,.0f} img/s ({native / plain:.2f}x)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", nargs="*", default=["fastcnn:960", "fastcnn:256", "fastcnn_s:256", "fastcnn_l:256"],
                   metavar="MODEL:BATCH")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if kernels.load("maxpool2") is None:
        sys.exit("error: the native kernels are not available here (no C compiler, or SEMIPRUNE_NATIVE=0); "
                 "install a C compiler (cc) or unset SEMIPRUNE_NATIVE")
    keep_freed_memory()  # as every stage process does
    report = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "max_pool": pools(args.reps), "training": training(args.train, args.rounds)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
