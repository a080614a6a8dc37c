"""The native CPU kernels against torch's, alternated in one process (this machine is noisy).

(a) ``fastcnn``'s 2x2 max-pools alone, at the shapes training meets (bf16 and fp32, channels_last):
    forward + backward through autograd, and the inference forward (the native kernel against the
    strided-view maximum used where it does not apply); median of ``--reps`` calls each.
(b) The first conv fused with its pool (``conv_pool``) against oneDNN's conv and the pool above, at
    the first layers of ``fastcnn`` and ``fastcnn_l`` (bf16 autocast): forward + weight gradient, and
    the inference forward.
(c) A training-mode BatchNorm and its ReLU (``bn_relu``) against torch's two, forward + backward at
    the shapes ``fastcnn`` and ``fastcnn_s`` train (bf16).
(d) One epoch of the engine on Fashion-MNIST per model and batch (``--train fastcnn:960 ...``, in
    ``--precision``: bf16, or fp32 as CPUs without native bf16 train) four ways, alternated ``--rounds`` times: torch's kernels, the native kernels with BatchNorm and
    ReLU left to torch, the native kernels with oneDNN's weight gradient, and every native kernel; the
    median images per second of each.
(e) Inference per model (``--inference fastcnn fastcnn_l fastcnn_s``): :func:`predict` over 20,000
    Fashion-MNIST images (bf16) three ways, alternated ``--rounds`` times: torch's kernels, the native
    kernels with BatchNorm and ReLU run apart, and the native kernels applying them as the pools write
    (what inference runs); the median images per second of each.
(g) The weight gradient of a 3x3 conv on AMX tiles (``conv_wgrad``, bf16) and with AVX2 FMA
    (``conv_wgrad_f32``, fp32), each where this CPU runs it, against oneDNN's backward-weights kernel at
    the shapes ``fastcnn``, ``fastcnn_l`` and ``fastcnn_s`` train (on 3x3 maps also the one matrix
    product over the batch that runs there instead above :data:`fastcnn.SMALL_MAP_MIN_WORK`), and its
    share of (d): the engine with every native kernel but these.
(h) FixMatch's strong view of 448 images (Fashion-MNIST- and CIFAR-sized) with RandAugment's colour
    ops in the native call (``views.colour_ops``) and as torch's ops grouped by op, alternated.
(f) With ``--accuracy-seeds N``: the test accuracy of each ``--accuracy MODEL:BATCH`` trained on the
    whole of Fashion-MNIST for ``--accuracy-epochs`` (bf16, weak view, Nesterov SGD with warmup and
    cosine) the four ways of (d), seeds 0..N-1: the fused first layer, the BatchNorm kernel and the
    AMX weight gradient are not bit for bit torch's, so their effect on accuracy is measured against
    the seeds' spread.

    python benchmarks/bench_kernels.py [--train fastcnn:960 fastcnn:256 fastcnn_s:256 fastcnn_l:256] [--inference fastcnn] [--json out.json]
    python benchmarks/bench_kernels.py --train --accuracy-seeds 3 --accuracy fastcnn:256 fastcnn:960
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
from semiprune_core.kernels import bn_relu, conv_pool, conv_wgrad, conv_wgrad_f32, maxpool2, views  # noqa: E402
from semiprune_core.models import create_model  # noqa: E402
from semiprune_core.models import fastcnn  # noqa: E402
from semiprune_core.models.fastcnn import MaxPool2, small_map_weight_grad  # noqa: E402
from semiprune_core.training import Schedule, SupervisedObjective, augment, evaluate, fit, predict  # noqa: E402

POOL_SHAPES = [(960, 16, 28, 28), (960, 32, 14, 14), (960, 64, 7, 7), (256, 16, 28, 28), (256, 16, 14, 14), (256, 32, 7, 7)]
CONV_POOL_SHAPES = [(960, 1, 16, 28), (256, 1, 16, 28), (256, 1, 32, 28)]  # batch, c_in, c_out, size
BN_RELU_SHAPES = [(960, 16, 14, 14), (960, 32, 7, 7), (960, 64, 3, 3), (960, 128, 3, 3), (256, 16, 7, 7), (256, 64, 3, 3)]
WGRAD_SHAPES = [(512, 16, 32, 14), (512, 32, 64, 7), (960, 16, 32, 14), (960, 32, 64, 7), (256, 32, 64, 14),
                (256, 64, 128, 7), (512, 64, 128, 3), (960, 64, 128, 3),  # fastcnn, fastcnn_l
                (512, 4, 8, 14), (512, 8, 16, 14), (512, 32, 64, 3), (256, 4, 8, 14), (256, 8, 16, 14),
                (256, 32, 64, 3), (512, 128, 256, 3), (256, 128, 256, 3)]  # fastcnn_s, fastcnn_l: batch, c_in, c_out, size
KERNELS = {"maxpool2": maxpool2, "conv_pool": conv_pool, "bn_relu": bn_relu, "conv_wgrad": conv_wgrad,
           "conv_wgrad_f32": conv_wgrad_f32}
NATIVE_APPLIES = {name: module.applies for name, module in KERNELS.items()}
TORCH_APPLIES = {"maxpool2": lambda x: False, "conv_pool": lambda x, conv: False, "bn_relu": lambda x, bn: False,
                 "conv_wgrad": lambda x, weight: False, "conv_wgrad_f32": lambda x, weight: False}


def use_native(on: bool | tuple[str, ...]) -> None:
    """Every kernel (True), none (False), or the ones named."""
    names = KERNELS if on is True else () if on is False else on
    for name, module in KERNELS.items():
        module.applies = (NATIVE_APPLIES if name in names else TORCH_APPLIES)[name]


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


def conv_pools(reps: int) -> list[dict]:
    rows = []
    for batch, c_in, c_out, size in CONV_POOL_SHAPES:
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(batch, c_in, size, size).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(batch, c_out, size // 2, size // 2).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        row = {"batch": batch, "c_in": c_in, "c_out": c_out, "size": size, "dtype": "bfloat16"}

        def layer():
            if conv_pool.applies(x, conv):
                return conv_pool.conv3x3_max_pool2(x, conv.weight)
            return MaxPool2()(conv(x))

        for on in (True, False):
            use_native(on)
            name = "native" if on else "torch"
            with torch.autocast("cpu", dtype=torch.bfloat16):
                row[f"train_ms_{name}"] = median_ms(lambda: torch.autograd.grad(layer(), conv.weight, grad), reps)
                with torch.no_grad():
                    row[f"infer_ms_{name}"] = median_ms(layer, reps)
        use_native(True)
        rows.append(row)
        print(f"conv {c_in}->{c_out} + pool at {size}x{size}, batch {batch}: forward+weight gradient "
              f"{row['train_ms_torch']:.3f} -> {row['train_ms_native']:.3f} ms ({row['train_ms_torch'] / row['train_ms_native']:.2f}x); "
              f"inference {row['infer_ms_torch']:.3f} -> {row['infer_ms_native']:.3f} ms ({row['infer_ms_torch'] / row['infer_ms_native']:.2f}x)",
              flush=True)
    return rows


def bn_relus(reps: int) -> list[dict]:
    rows = []
    for shape in BN_RELU_SHAPES:
        bn = torch.nn.BatchNorm2d(shape[1])
        x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
        grad = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        row = {"shape": list(shape), "dtype": "bfloat16"}
        for on in (True, False):
            use_native(on)
            layer = (lambda: bn_relu.batch_norm_relu(x, bn)) if bn_relu.applies(x, bn) else (lambda: torch.relu(bn(x)))
            row[f"train_ms_{'native' if on else 'torch'}"] = median_ms(lambda: torch.autograd.grad(layer(), x, grad), reps)
        use_native(True)
        rows.append(row)
        print(f"training BatchNorm + ReLU {str(tuple(shape)):>18}: forward+backward {row['train_ms_torch']:.3f} -> "
              f"{row['train_ms_native']:.3f} ms ({row['train_ms_torch'] / row['train_ms_native']:.2f}x)", flush=True)
    return rows


def wgrads(reps: int) -> list[dict]:
    rows = []
    for dtype, module in ((torch.bfloat16, conv_wgrad), (torch.float32, conv_wgrad_f32)):
        if not module.applies(torch.empty(1, 16, 7, 7, dtype=dtype), torch.empty(32, 16, 3, 3, dtype=dtype)):
            print(f"{module.__name__.rsplit('.', 1)[-1]}: this CPU does not run it (conv_wgrad needs AMX, conv_wgrad_f32 "
                  f"AVX2 without AVX-512); skipped", flush=True)
            continue
        for batch, c_in, c_out, size in WGRAD_SHAPES:
            x = torch.randn(batch, c_in, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
            grad = torch.randn(batch, c_out, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(c_out, c_in, 3, 3).to(dtype)
            onednn = median_ms(lambda: torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]), reps)
            native = median_ms(lambda: module.conv3x3_weight_grad(x, grad), reps)
            row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "c_in": c_in, "c_out": c_out, "size": size,
                   "ms_onednn": onednn, "ms_native": native}
            product = ""
            if size * size <= 9:  # where the one matrix product over the batch may run instead
                row["ms_small_map_product"] = median_ms(lambda: small_map_weight_grad(x, grad), reps)
                product = f"; the small-map matrix product {row['ms_small_map_product']:.3f} ms"
            rows.append(row)
            print(f"conv {c_in}->{c_out} weight gradient at {size}x{size}, batch {batch}, {row['dtype']}: {onednn:.3f} -> "
                  f"{native:.3f} ms ({onednn / native:.2f}x){product}", flush=True)
    return rows


def strong_views(reps: int) -> list[dict]:
    """(h): FixMatch's strong view of 448 images with RandAugment's colour ops native and with torch's
    grouped ops (``views.colour_ops_apply`` off), alternated per call."""
    rows = []
    for shape in ((448, 1, 28, 28), (448, 3, 32, 32)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        native_applies, times = views.colour_ops_apply, {"native": [], "torch": []}
        for r in range(2 * reps):
            way = ("native", "torch")[r % 2]
            views.colour_ops_apply = native_applies if way == "native" else (lambda x: False)
            generator = torch.Generator().manual_seed(r // 2)
            t0 = time.perf_counter()
            augment.strong_view(x, generator)
            times[way].append(time.perf_counter() - t0)
        views.colour_ops_apply = native_applies
        ms = {way: statistics.median(v[1:]) * 1e3 for way, v in times.items()}
        rows.append({"shape": list(shape), "ms_torch": ms["torch"], "ms_native": ms["native"]})
        print(f"strong view {str(shape):>18}: {ms['torch']:.3f} -> {ms['native']:.3f} ms "
              f"({ms['torch'] / ms['native']:.2f}x)", flush=True)
    return rows


def training(specs: list[str], rounds: int, precision: str) -> list[dict]:
    x, y, _, _ = load_fashion()
    ways = {"torch": False, "native_bn_apart": ("maxpool2", "conv_pool", "conv_wgrad", "conv_wgrad_f32"),
            "native_wgrad_apart": ("maxpool2", "conv_pool", "bn_relu"), "native": True}
    rows = []
    for spec in specs:
        name, batch = spec.split(":")
        batch = int(batch)
        n = min(len(x), batch * (20 if batch >= 512 else 60))  # one epoch of 20-60 steps
        rates: dict[str, list[float]] = {way: [] for way in ways}
        for r in range(rounds):
            for way in list(ways)[:: 1 if r % 2 == 0 else -1]:
                use_native(ways[way])
                model = create_model(name, in_channels=1, num_classes=10, image_size=28, seed=0)
                objective = SupervisedObjective(x[:n], y[:n], view="weak")
                t0 = time.perf_counter()
                fit(model, objective, Schedule(epochs=1, batch_size=batch, lr=0.1, warmup=0.05), seed=0, device="cpu",
                    precision=precision)
                rates[way].append(n / (time.perf_counter() - t0))
        use_native(True)
        rate = {way: statistics.median(v) for way, v in rates.items()}
        rows.append({"model": name, "batch_size": batch, "precision": precision, "images": n, "rounds": rounds,
                     **{f"img_per_s_{way}": v for way, v in rate.items()}, "speedup": rate["native"] / rate["torch"],
                     "speedup_bn_relu": rate["native"] / rate["native_bn_apart"],
                     "speedup_conv_wgrad": rate["native"] / rate["native_wgrad_apart"]})
        print(f"{name} batch {batch} {precision}: torch {rate['torch']:,.0f}, native with BatchNorm apart {rate['native_bn_apart']:,.0f}, "
              f"all native {rate['native']:,.0f} img/s ({rate['native'] / rate['torch']:.2f}x; the BatchNorm kernel "
              f"{rate['native'] / rate['native_bn_apart']:.2f}x; the native weight gradient "
              f"{rate['native'] / rate['native_wgrad_apart']:.2f}x)", flush=True)
    return rows


def inference(names: list[str], rounds: int) -> list[dict]:
    x = load_fashion()[0][:20_000]
    fold_bn_relu = fastcnn._bn_relu_after
    ways = {"torch": (False, fold_bn_relu), "native_bn_apart": (True, lambda body, i: None), "native": (True, fold_bn_relu)}
    rows = []
    for name in names:
        model = create_model(name, in_channels=1, num_classes=10, image_size=28, seed=0)
        rates: dict[str, list[float]] = {way: [] for way in ways}
        for r in range(rounds):
            for way in list(ways)[:: 1 if r % 2 == 0 else -1]:
                on, fastcnn._bn_relu_after = ways[way]
                use_native(on)
                t0 = time.perf_counter()
                predict(model, x, precision="bf16")
                rates[way].append(len(x) / (time.perf_counter() - t0))
        use_native(True)
        fastcnn._bn_relu_after = fold_bn_relu
        row = {"model": name, "images": len(x), "rounds": rounds, **{f"img_per_s_{way}": statistics.median(v) for way, v in rates.items()}}
        rows.append(row)
        print(f"{name} inference: torch {row['img_per_s_torch']:,.0f}, native kernels {row['img_per_s_native_bn_apart']:,.0f}, "
              f"with BatchNorm + ReLU in the pools {row['img_per_s_native']:,.0f} img/s "
              f"({row['img_per_s_native'] / row['img_per_s_native_bn_apart']:.2f}x)", flush=True)
    return rows


def accuracy(specs: list[str], seeds: int, epochs: int) -> list[dict]:
    x, y, x_test, y_test = load_fashion()
    rows = []
    for spec in specs:
        name, batch = spec.split(":")
        batch = int(batch)
        row: dict = {"model": name, "batch_size": batch, "epochs": epochs}
        ways = {"native": True, "native_bn_apart": ("maxpool2", "conv_pool", "conv_wgrad"),
                "native_wgrad_apart": ("maxpool2", "conv_pool", "bn_relu"), "torch": False}
        for way, on in ways.items():
            use_native(on)
            accs = []
            for seed in range(seeds):
                model = create_model(name, in_channels=1, num_classes=10, image_size=28, seed=seed)
                schedule = Schedule(epochs=epochs, batch_size=batch, lr=0.2 * batch / 512, warmup=0.05, weight_decay=5e-4)
                result = fit(model, SupervisedObjective(x, y, view="weak"), schedule, seed=seed, device="cpu", precision="bf16")
                accs.append(evaluate(result.model, x_test, y_test, precision="bf16"))
            row[f"test_acc_{way}"] = accs
        use_native(True)
        rows.append(row)
        per_seed = {k: [round(a * 100, 2) for a in row[f"test_acc_{k}"]] for k in ways}
        mean = {k: statistics.mean(v) for k, v in per_seed.items()}
        print(f"{name} batch {batch}, {epochs} epochs, {seeds} seeds: test accuracy torch {mean['torch']:.2f} %, native "
              f"with BatchNorm apart {mean['native_bn_apart']:.2f} %, with oneDNN's weight gradient "
              f"{mean['native_wgrad_apart']:.2f} %, all native {mean['native']:.2f} % (per seed {per_seed})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", nargs="*", default=["fastcnn:960", "fastcnn:256", "fastcnn_s:256", "fastcnn_l:256"],
                   metavar="MODEL:BATCH")
    p.add_argument("--inference", nargs="*", default=["fastcnn", "fastcnn_l", "fastcnn_s"], metavar="MODEL")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="(d)'s precision")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--accuracy", nargs="*", default=["fastcnn:256", "fastcnn:960"], metavar="MODEL:BATCH")
    p.add_argument("--accuracy-seeds", type=int, default=0, help="seeds of the accuracy part; 0 skips it")
    p.add_argument("--accuracy-epochs", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if set(kernels.NAMES) - set(kernels.available()) - {"conv_wgrad", "conv_wgrad_f32"}:  # per CPU: (g) says which
        sys.exit("error: the native kernels are not available here (no C compiler, or SEMIPRUNE_NATIVE=0); "
                 "install a C compiler (cc) or unset SEMIPRUNE_NATIVE")
    keep_freed_memory()  # as every stage process does
    report = {"machine": {"platform": platform.platform(), "cpu": kernels.cpu_model(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "max_pool": pools(args.reps), "conv_pool": conv_pools(args.reps), "bn_relu": bn_relus(args.reps),
              "conv_wgrad": wgrads(args.reps), "strong_view": strong_views(args.reps),
              "training": training(args.train, args.rounds, args.precision),
              "inference": inference(args.inference, args.rounds)}
    if args.accuracy_seeds:
        report["accuracy"] = accuracy(args.accuracy, args.accuracy_seeds, args.accuracy_epochs)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
