"""Benchmark of the training engine on Fashion-MNIST (60k train / 10k test, 28x28, CPU by default).

(a) accuracy under a wall-clock budget: ``fastcnn_s`` trained with :func:`fit` (weak view = flip +
    pad-and-crop by 1 px, batch 512, Nesterov SGD, 5% warmup + cosine) for a fixed epoch count
    sized to fit the budget on a quiet 2-core CPU with ~2.5x headroom. The schedule's
    ``max_seconds`` guard stops it (un-annealed, flagged) if the machine is much slower. Reports the
    exact training wall time and the final-epoch test accuracy, in the engine's precision and in fp32.
(b) throughput per model (``--models``), same batch size: the engine (uint8 tensor on the device,
    batched weak view with padding 2, ``--precision``) against a plain loop over a torchvision
    ``DataLoader`` whose ``Dataset`` applies v2 transforms per sample (RandomHorizontalFlip,
    RandomCrop(28, padding=2), ToDtype, Normalize) with ``--workers`` loader processes (default 0 and
    2; pinned memory on a GPU), each loop once in fp32 and once under the engine's autocast, and over
    the stock ``torchvision.datasets.FashionMNIST`` (PIL per sample, the last ``--workers`` value).
    Same model in the same memory format (channels_last) in every loop. Each model's ratio uses its
    fastest baseline. Also each model's inference rate (:func:`predict`, what held-out scoring runs
    every epoch) and the input pipelines alone (no model), for reference.
    ``--compile`` also measures the engine with the model compiled (``fit(compile=True)``): the
    compile's seconds and the steady rate after it.

    python benchmarks/bench_engine.py [--budget-seconds 120] [--models fastcnn_s fastcnn] [--json out.json]

The process keeps freed memory as the stage processes do (:mod:`semiprune_core.allocator`);
``SEMIPRUNE_NATIVE=0`` measures without the native CPU kernels (:mod:`semiprune_core.kernels`;
``machine.native_kernels`` in the JSON says which ran). On a GPU
every timing ends with ``torch.cuda.synchronize()``. Threads: torch's default (all cores) unless
``--threads`` is given. Timings on a shared machine are noisy; compare ratios measured in one run.
``--widths``, ``--depth`` and ``--stem`` measure other fastcnn shapes (accuracy part).
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import _checkout  # noqa: F401,E402  (first: this checkout's code, not the installed package's)
from semiprune_core import kernels
from semiprune_core.allocator import keep_freed_memory
from semiprune_core.compat import import_torchvision
from semiprune_core.data.idx import read_idx
from semiprune_core.models import create_model
from semiprune_core.training import (
    Schedule,
    SupervisedObjective,
    evaluate,
    fit,
    predict,
    resolve_device,
    resolve_precision,
    to_float,
)
from semiprune_core.training.engine import precision_name

FASHION = Path("/usr/share/datasets/fashion-mnist")
SEED = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_fashion(root: Path = FASHION) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(60000, 1, 28, 28) uint8, (60000,) int64, (10000, 1, 28, 28) uint8, (10000,) int64."""

    def images(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(root / name).copy()).unsqueeze(1)

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(root / name).astype(np.int64))

    return (
        images("train-images-idx3-ubyte.gz"),
        labels("train-labels-idx1-ubyte.gz"),
        images("t10k-images-idx3-ubyte.gz"),
        labels("t10k-labels-idx1-ubyte.gz"),
    )


def model_for(args: argparse.Namespace, name: str | None = None) -> torch.nn.Module:
    """``name`` from the registry as is, or (None) the accuracy model ``--model`` with ``--widths/--depth/--stem``."""
    if name is not None:
        return create_model(name, in_channels=1, num_classes=10, image_size=28, seed=SEED)
    options = {"depth": args.depth, **({"widths": tuple(args.widths)} if args.widths else {})}
    if args.stem:
        options["stem"] = args.stem
    return create_model(args.model, in_channels=1, num_classes=10, image_size=28, seed=SEED, **options)


def describe_model(model: torch.nn.Module, name: str) -> str:
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    shape = f"conv widths {widths}, " if widths else ""
    return f"{name} ({shape}{sum(p.numel() for p in model.parameters()):,} params)"


# --- (a) accuracy within a budget ---------------------------------------------------------------------


def bench_accuracy(args, x_train, y_train, x_test, y_test, device, precision: str) -> dict:
    schedule = Schedule(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, max_seconds=args.budget_seconds,
    )
    objective = SupervisedObjective(x_train, y_train, view="weak", padding=args.padding, label_smoothing=args.label_smoothing)
    model = model_for(args)
    result = fit(model, objective, schedule, seed=SEED, device=device, precision=precision, desc=f"bench[{precision}]")
    t0 = time.perf_counter()
    test_acc = evaluate(result.model, x_test, y_test, batch_size=2000, precision=precision)
    return {
        "model": describe_model(model, args.model),
        "precision": result.precision,
        "schedule": {**schedule.__dict__, "padding": args.padding, "label_smoothing": args.label_smoothing},
        "epochs_completed": result.epochs_completed,
        "stopped_early": result.stopped_early,
        "train_wall_seconds": result.wall_seconds,
        "budget_seconds": args.budget_seconds,
        "final_train_acc": result.history[-1]["acc"],
        "test_acc": test_acc,
        "eval_seconds": time.perf_counter() - t0,
        "history": result.history,
    }


# --- (b) throughput --------------------------------------------------------------------------------


def _v2_transform(*, from_pil: bool):
    import_torchvision()  # makes torchvision importable on a CPU torch (see semiprune_core.compat)
    v2 = importlib.import_module("torchvision.transforms.v2")
    return v2.Compose([
        *([v2.ToImage()] if from_pil else []),
        v2.RandomHorizontalFlip(),
        v2.RandomCrop(28, padding=2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.5,), (0.5,)),
    ])


class _PerSampleDataset(torch.utils.data.Dataset):
    """The uint8 tensors, one sample at a time, through a per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def _stock_fashion_mnist(root: Path, source: Path = FASHION):
    """torchvision.datasets.FashionMNIST (PIL images per sample) over the local IDX files."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in source.glob("*-ubyte.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    tv = import_torchvision()
    return tv.datasets.FashionMNIST(str(root), train=True, download=False, transform=_v2_transform(from_pil=True))


def _loader(dataset, args, num_workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
        generator=torch.Generator().manual_seed(SEED), pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def engine_train_rate(args, name, x_train, y_train, device, *, compile: bool | str = False) -> tuple[float, float]:
    """Images/s of :func:`fit` (weak view, padding 2 like the baselines) over ``steps`` steps, and the
    seconds of the warm-up call (which includes the compile when ``compile``). One model instance
    serves both calls, so a compiled forward is reused."""
    bs, steps = args.batch_size, args.throughput_steps
    schedule = Schedule(epochs=1, batch_size=bs, lr=0.05)
    model = model_for(args, name)
    n_warm = bs * args.warmup_steps
    t0 = time.perf_counter()
    fit(model, SupervisedObjective(x_train[:n_warm], y_train[:n_warm], padding=2), schedule, seed=SEED,
        device=device, precision=args.precision, compile=compile)
    warm_seconds = time.perf_counter() - t0
    n = min(bs * steps, len(x_train))
    result = fit(model, SupervisedObjective(x_train[:n], y_train[:n], padding=2), schedule, seed=SEED,
                 device=device, precision=args.precision, compile=False)  # already compiled in place
    return result.sample_passes / result.train_seconds, warm_seconds


def engine_predict_rate(args, name, x_train, device) -> float:
    """Images/s of :func:`predict` (eval mode, no augmentation, its default batch of 1024) over the
    first ``--predict-images`` training images: the held-out pass of every scoring epoch, the
    pseudo-labels and the test accuracy run it."""
    model = model_for(args, name)
    predict(model, x_train[:2048], device=device, precision=args.precision)  # warm-up
    x = x_train[: args.predict_images]
    _sync(device)
    t0 = time.perf_counter()
    predict(model, x, device=device, precision=args.precision)
    _sync(device)
    return len(x) / (time.perf_counter() - t0)


def loader_train_rate(args, name, loader, device, amp: torch.dtype | None) -> float:
    """Images/s of a plain training loop over ``loader`` (same model and memory layout; the optimiser
    is the plain loop's ``torch.optim.SGD``, whose arithmetic the engine's SGD repeats), its forward
    under autocast ``amp`` (None = fp32)."""
    model = model_for(args, name).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    t0, done = None, 0
    for i, (x, y) in enumerate(loader):
        if i == args.warmup_steps:
            t0 = time.perf_counter()
        if i == args.warmup_steps + args.throughput_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += len(x) if t0 is not None else 0
        if i + 1 == args.warmup_steps:
            _sync(device)  # the clock starts on an idle device
    _sync(device)
    return done / (time.perf_counter() - t0)


def engine_data_rate(args, x_train, y_train, device) -> float:
    """Images/s of the engine's input pipeline alone: slice, weak view, to_float (no model)."""
    objective = SupervisedObjective(x_train, y_train, view="weak", padding=2).to(device)
    batches = objective.batches(0, args.batch_size, torch.Generator(device=device).manual_seed(SEED))
    _sync(device)
    t0, n = time.perf_counter(), 0
    for i, batch in zip(range(args.throughput_steps), batches):
        n += len(to_float(batch.images))
    _sync(device)
    return n / (time.perf_counter() - t0)


def loader_data_rate(args, loader) -> float:
    t0, n = time.perf_counter(), 0
    for i, (x, _) in zip(range(args.throughput_steps), loader):
        n += len(x)
    return n / (time.perf_counter() - t0)


def bench_throughput(args, x_train, y_train, device) -> dict:
    """Per model: the engine and every baseline loop, images per second, and the engine's ratio to the fastest."""
    n = args.batch_size * (args.throughput_steps + args.warmup_steps)
    tensor_ds = _PerSampleDataset(x_train[:n], y_train[:n], _v2_transform(from_pil=False))
    amp = resolve_precision(args.precision, device)
    precisions = {"fp32": None, **({precision_name(amp): amp} if amp is not None else {})}
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        stock = _stock_fashion_mnist(Path(tmp), args.data)
        for name in args.models:
            engine_key = f"engine_{precision_name(amp)}"
            rate, _ = engine_train_rate(args, name, x_train, y_train, device)
            train = {engine_key: rate}
            for pname, pdtype in precisions.items():
                for workers in args.workers:
                    train[f"dataloader_tensor_w{workers}_{pname}"] = loader_train_rate(
                        args, name, _loader(tensor_ds, args, workers, device), device, pdtype)
                train[f"dataloader_torchvision_pil_w{args.workers[-1]}_{pname}"] = loader_train_rate(
                    args, name, _loader(stock, args, args.workers[-1], device), device, pdtype)
            baselines = {k: v for k, v in train.items() if k != engine_key}
            best = max(baselines, key=baselines.get)
            models[name] = {"model": describe_model(model_for(args, name), name), "train_img_per_s": train,
                            "best_baseline": best, "ratio": train[engine_key] / baselines[best],
                            "predict_img_per_s": engine_predict_rate(args, name, x_train, device)}
            line = (f"  {name}: engine {train[engine_key]:,.0f} img/s, best baseline {best} {baselines[best]:,.0f} img/s: "
                    f"{models[name]['ratio']:.2f}x; inference {models[name]['predict_img_per_s']:,.0f} img/s")
            if args.compile:
                rate, seconds = engine_train_rate(args, name, x_train, y_train, device, compile=args.compile)
                models[name]["compiled"] = {"mode": "default" if args.compile is True else args.compile,
                                            "train_img_per_s": rate, "warmup_seconds_with_compile": seconds,
                                            "speedup": rate / train[engine_key]}
                line += f"; compiled {rate:,.0f} img/s ({rate / train[engine_key]:.2f}x, {seconds:.1f} s to compile and warm up)"
            print(line, flush=True)
        data = {
            "engine": engine_data_rate(args, x_train, y_train, device),
            "dataloader_tensor_w0": loader_data_rate(args, _loader(tensor_ds, args, 0, device)),
            "dataloader_torchvision_pil_w0": loader_data_rate(args, _loader(stock, args, 0, device)),
        }
    return {
        "batch_size": args.batch_size, "steps": args.throughput_steps, "warmup_steps": args.warmup_steps,
        "precision": precision_name(amp), "models": models, "data_only_img_per_s": data,
        "data_only_ratio": data["engine"] / max(v for k, v in data.items() if k != "engine"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-seconds", type=float, default=120.0)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--padding", type=int, default=1)
    p.add_argument("--model", default="fastcnn_s", help="the accuracy part's model: a fastcnn variant from the registry")
    p.add_argument("--models", nargs="+", default=["fastcnn_s", "fastcnn", "fastcnn_l", "mlp"],
                   help="the throughput part's models (registry names)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="the engine's precision")
    p.add_argument("--widths", type=int, nargs="+", help="override the model's widths")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--stem", choices=["conv", "s2d"], help="override the model's stem")
    p.add_argument("--throughput-steps", type=int, default=100)
    p.add_argument("--predict-images", type=int, default=30000, help="images of the inference rate (predict)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", type=Path, default=FASHION, help="folder of the four Fashion-MNIST IDX files")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader processes of the baselines (the stock PIL loader uses the last)")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="also measure the engine with the model compiled (optionally a torch.compile mode, e.g. reduce-overhead)")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    kept = keep_freed_memory()  # as every stage process does; the loaders' workers inherit it
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    x_train, y_train, x_test, y_test = load_fashion(args.data)
    report: dict = {
        "machine": {"platform": platform.platform(), "cpu": kernels.cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                    "keeps_freed_memory": kept, "native_kernels": kernels.available(),
                    **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})},
        "load_seconds": time.perf_counter() - t0,
    }

    if not args.skip_accuracy:
        runs = dict.fromkeys([precision_name(resolve_precision(args.precision, device)), "fp32"])
        report["accuracy"] = accs = [bench_accuracy(args, x_train, y_train, x_test, y_test, device, p) for p in runs]
    if not args.skip_throughput:
        report["throughput"] = thr = bench_throughput(args, x_train, y_train, device)

    print(f"\nsemiprune engine benchmark  (torch {torch.__version__}, {torch.get_num_threads()} threads, {device})")
    for acc in report.get("accuracy", []):
        print(f"(a) {acc['model']}, {acc['precision']}: {acc['epochs_completed']} epochs, batch {args.batch_size}, lr {args.lr}: "
              f"{acc['train_wall_seconds']:.1f} s of training (budget {args.budget_seconds:.0f} s), "
              f"final-epoch test accuracy {acc['test_acc'] * 100:.2f} %")
    if "throughput" in report:
        print(f"(b) training throughput, batch {args.batch_size}, {args.throughput_steps} steps after {args.warmup_steps} "
              f"warm-up, engine in {thr['precision']} (img/s)")
        for name, m in thr["models"].items():
            cols = "  ".join(f"{k} {v:,.0f}" for k, v in m["train_img_per_s"].items())
            print(f"    {m['model']}: {m['ratio']:.2f}x the best baseline ({m['best_baseline']}); "
                  f"inference {m['predict_img_per_s']:,.0f} img/s\n      {cols}")
        data = thr["data_only_img_per_s"]
        print(f"    input pipelines alone: engine {data['engine']:,.0f} img/s, per-sample DataLoader "
              f"{data['dataloader_tensor_w0']:,.0f}, torchvision PIL {data['dataloader_torchvision_pil_w0']:,.0f} "
              f"({thr['data_only_ratio']:.0f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
