"""Native CPU kernels: torch's results (bit for bit, or to the order of fp32 sums), built once per
machine, torch's kernels where none builds."""

from __future__ import annotations

import copy
import ctypes
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from semiprune_core import kernels
from semiprune_core.kernels import bn_relu
from semiprune_core.kernels import conv_pool
from semiprune_core.kernels import conv_wgrad
from semiprune_core.kernels import conv_wgrad_f32
from semiprune_core.kernels import maxpool2 as native
from semiprune_core.kernels import views
from semiprune_core.models import create_model
from semiprune_core.models.fastcnn import MaxPool2
from semiprune_core.training import augment
from semiprune_core.training.engine import cpu_has_native_bf16

needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None or not kernels.enabled(),
                                    reason="no C compiler (or SEMIPRUNE_NATIVE=0): torch's kernels are used")


def _ties_and_nans(shape, dtype, seed=0) -> torch.Tensor:
    """Small integers (many ties inside a 2x2 window), some NaN and -inf, in channels_last."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[: max(1, flat.numel() // 50)]] = float("nan")
    flat[torch.randperm(flat.numel(), generator=gen)[: max(1, flat.numel() // 50)]] = float("-inf")
    return x.contiguous(memory_format=torch.channels_last)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 28, 28), (2, 4, 7, 9), (1, 3, 2, 3), (2, 16, 3, 3),
                                   (160, 16, 28, 28)])  # the last one is split over two threads
def test_native_max_pool_gives_torchs_bits_forward_and_backward(shape, dtype):
    x = _ties_and_nans(shape, dtype).requires_grad_()
    assert native.applies(x)
    want, got = F.max_pool2d(x, 2), MaxPool2()(x)
    assert got.grad_fn.name() == "_MaxPool2Backward"  # the native path ran
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (grad_want,) = torch.autograd.grad(want, x, grad)
    (grad_got,) = torch.autograd.grad(got, x, grad.contiguous(memory_format=torch.channels_last))
    assert torch.equal(grad_got, grad_want)  # ties: the first maximum takes it; odd edges: zero
    with torch.no_grad():
        values = MaxPool2()(x)
    assert values.grad_fn is None and torch.equal(values.nan_to_num(), want.nan_to_num())


@needs_compiler
def test_fastcnn_trains_with_the_native_pool_to_torchs_weights(monkeypatch):
    """Two steps of fastcnn under bf16 autocast, native pool vs torch's: the same weights, bit for bit."""
    monkeypatch.setattr(conv_pool, "applies", lambda x, conv: False)  # every pool a pool, not fused with its conv
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), generator=gen)

    def train() -> tuple[dict[str, torch.Tensor], set[str]]:
        model = create_model("fastcnn", in_channels=1, num_classes=10, image_size=28, seed=0).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        pools = set()
        for module in model.modules():
            if isinstance(module, MaxPool2):
                module.register_forward_hook(lambda m, i, out: pools.add(out.grad_fn.name()))
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model.state_dict(), pools

    native_weights, native_pools = train()
    monkeypatch.setattr(native, "applies", lambda t: False)
    torch_weights, torch_pools = train()
    assert native_pools == {"_MaxPool2Backward"} and torch_pools == {"MaxPool2DWithIndicesBackward0"}
    for (name, a), b in zip(native_weights.items(), torch_weights.values()):
        assert torch.equal(a, b), name


def test_pools_the_kernel_does_not_take_stay_torchs():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)  # NCHW
    assert not native.applies(x)
    assert MaxPool2()(x).grad_fn.name() == "MaxPool2DWithIndicesBackward0"
    assert not native.applies(torch.randn(2, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last))
    assert not native.applies(torch.randn(2, 3, 1, 8).contiguous(memory_format=torch.channels_last))  # torch's error


def _load_fresh(monkeypatch, tmp_path, **env) -> object:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    kernels.load.cache_clear()
    try:
        return kernels.load("maxpool2")
    finally:
        kernels.load.cache_clear()  # the next caller loads with the real environment


@needs_compiler
def test_a_kernel_is_built_once_per_machine_and_then_reused(monkeypatch, tmp_path):
    assert _load_fresh(monkeypatch, tmp_path) is not None
    (built,) = (tmp_path / "cache/semiprune/kernels").iterdir()
    assert built.name.startswith("maxpool2-") and built.suffix == ".so"
    monkeypatch.setattr(kernels.subprocess, "run", lambda *a, **k: pytest.fail("built a second time"))
    assert _load_fresh(monkeypatch, tmp_path) is not None


def test_a_change_to_a_source_or_a_header_names_a_new_build(tmp_path):
    for f in ("conv_pool.c", "parallel.h"):
        shutil.copy(Path(kernels.__file__).with_name(f), tmp_path / f)
    key = kernels.build_key(tmp_path / "conv_pool.c", "cc")
    assert kernels.build_key(tmp_path / "conv_pool.c", "cc") == key and kernels.build_key(tmp_path / "conv_pool.c", "clang") != key
    (tmp_path / "parallel.h").write_text((tmp_path / "parallel.h").read_text().replace("1 << 17", "1 << 16"))
    assert kernels.build_key(tmp_path / "conv_pool.c", "cc") != key


@needs_compiler
def test_a_damaged_library_in_the_cache_is_built_again(tmp_path):
    # each load in a fresh process: a process that already loaded the library gets dlopen's handle back
    code = "from semiprune_core import kernels; assert kernels.load('maxpool2').maxpool2_forward"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    (built,) = (tmp_path / "semiprune/kernels").iterdir()
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"not a shared library")
    os.replace(damaged, built)  # a new file, as a failed copy would leave it
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_without_a_compiler_the_reason_is_logged_and_torchs_kernel_runs(monkeypatch, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="semiprune_core.kernels"):
        assert _load_fresh(monkeypatch, tmp_path, CC=str(tmp_path / "no-such-cc"), SEMIPRUNE_NATIVE="1") is None
    assert "native kernel maxpool2 unavailable" in caplog.text and "using torch's kernel" in caplog.text
    assert not any((tmp_path / "cache").rglob("*.tmp"))  # nothing half-written left behind
    assert _load_fresh(monkeypatch, tmp_path, CC="/bin/false") is None  # a compiler that fails


def test_a_cache_folder_others_may_write_is_refused(monkeypatch, tmp_path, caplog):
    folder = tmp_path / "cache/semiprune/kernels"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with caplog.at_level(logging.INFO, logger="semiprune_core.kernels"):
        assert _load_fresh(monkeypatch, tmp_path, SEMIPRUNE_NATIVE="1") is None
    assert "is not private to this user" in caplog.text and "chmod 700" in caplog.text
    assert list(folder.iterdir()) == []  # nothing built, nothing loaded from there


def test_semiprune_native_0_turns_the_kernels_off(monkeypatch, tmp_path):
    assert _load_fresh(monkeypatch, tmp_path, SEMIPRUNE_NATIVE="0") is None
    assert not (tmp_path / "cache/semiprune").exists()


def test_semiprune_native_may_name_the_kernels_that_run(monkeypatch):
    monkeypatch.setenv("SEMIPRUNE_NATIVE", "maxpool2")
    assert kernels.enabled() and kernels.enabled("maxpool2") and not kernels.enabled("conv_pool")
    monkeypatch.setenv("SEMIPRUNE_NATIVE", "conv_pool, maxpool2")
    assert kernels.enabled("maxpool2") and kernels.enabled("conv_pool")
    monkeypatch.setenv("SEMIPRUNE_NATIVE", "1")
    assert kernels.enabled("conv_pool")


def test_semiprune_native_naming_an_unknown_kernel_says_so(monkeypatch, caplog):
    monkeypatch.setenv("SEMIPRUNE_NATIVE", "maxpol2")
    with caplog.at_level(logging.WARNING, logger="semiprune_core.kernels"):
        assert not kernels.enabled("maxpool2")
    assert "unknown kernels maxpol2" in caplog.text and "maxpool2, conv_pool" in caplog.text


@needs_compiler
def test_processes_building_at_once_each_load_a_whole_library(tmp_path):
    code = "from semiprune_core import kernels; assert kernels.load('maxpool2') is not None"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert len(list((tmp_path / "semiprune/kernels").glob("maxpool2-*.so"))) == 1
    assert not list((tmp_path / "semiprune/kernels").glob(".*.tmp"))


# --- the first conv fused with its pool ------------------------------------------------------------------


def _first_layer(c_in: int, c_out: int, seed: int = 0) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(memory_format=torch.channels_last)


def _reference_weight_grad(x, weight, grad) -> torch.Tensor:
    """float64 weight gradient of conv -> pool (torch's pool: a tie goes to the first maximum)."""
    x64, w64 = x.double(), weight.detach().double()
    y = F.conv2d(x64, w64, padding=1)
    _, index = F.max_pool2d(y, 2, return_indices=True)
    full = F.max_unpool2d(grad.double(), index, 2, output_size=y.shape[-2:])
    return torch.nn.grad.conv2d_weight(x64, w64.shape, full, padding=1)


@needs_compiler
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("n,c_in,c_out,h,w", [(37, 1, 16, 28, 28), (5, 3, 32, 32, 32), (4, 1, 16, 7, 9), (3, 2, 48, 2, 3),
                                              (160, 1, 16, 28, 28)])  # the last one is split over two threads
def test_fused_conv_and_pool_give_torchs_outputs_and_a_more_exact_weight_gradient(n, c_in, c_out, h, w, bf16):
    gen = torch.Generator().manual_seed(1)
    conv = _first_layer(c_in, c_out)
    # on a coarse grid every product and sum is exact in bf16 and fp32, whatever the order: the outputs
    # must be torch's exactly, ties (many) included
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape, generator=gen) / 8)
    x = torch.randint(-3, 4, (n, c_in, h, w), generator=gen) / 4
    assert conv_pool.applies(x, conv)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        want = F.max_pool2d(conv(x.contiguous(memory_format=torch.channels_last)), 2)
        got = conv_pool.conv3x3_max_pool2(x, conv.weight)
        with torch.no_grad():
            values = conv_pool.conv3x3_max_pool2(x, conv.weight)
    assert got.grad_fn.name() == "_ConvMaxPool2Backward" and values.grad_fn is None
    assert got.dtype == want.dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want) and torch.equal(values, want)
    grad = torch.randn(want.shape, generator=gen).to(want.dtype)
    (grad_got,) = torch.autograd.grad(got, conv.weight, grad.contiguous(memory_format=torch.channels_last))
    reference = _reference_weight_grad(x, conv.weight, grad)
    assert grad_got.dtype == torch.float32 and grad_got.shape == conv.weight.shape
    assert (grad_got.double() - reference).norm() < 1e-5 * reference.norm()  # summed in fp32: oneDNN's bf16 kernel rounds
    (grad_want,) = torch.autograd.grad(want, conv.weight, grad)
    if bf16 and not cpu_has_native_bf16():  # oneDNN's emulated bf16 kernel is further off (3 % on an AVX2 EPYC)
        assert (grad_got.double() - reference).norm() <= (grad_want.double() - reference).norm()
    else:
        torch.testing.assert_close(grad_got, grad_want, rtol=0.01 if bf16 else 1e-5, atol=1e-3 * grad_want.abs().max().item())


@needs_compiler
@pytest.mark.parametrize("bf16", [True, False])
def test_fused_conv_and_pool_match_torch_on_real_valued_input_to_a_rounding_step(bf16):
    conv = _first_layer(1, 16)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        want = F.max_pool2d(conv(x.contiguous(memory_format=torch.channels_last)), 2)
        got = conv_pool.conv3x3_max_pool2(x, conv.weight)
    # oneDNN may sum in another order: a value may differ by one rounding step (in bf16, rarely)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7 if bf16 else 1e-5, atol=1e-5)
    assert not bf16 or (got != want).float().mean() < 0.01


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector widths")
@pytest.mark.parametrize("narrower", ["-mno-avx512f", "-mno-avx"])  # 8 and 4 channels per vector instead of 16
def test_the_fused_kernel_gives_the_same_results_on_cpus_with_narrower_vectors(tmp_path, narrower):
    source = Path(kernels.__file__).with_name("conv_pool.c")
    subprocess.run([os.environ.get("CC", "cc"), *kernels.FLAGS, narrower, str(source), "-o", str(tmp_path / "narrow.so")],
                   check=True, capture_output=True, timeout=120)
    narrow = conv_pool.declare(ctypes.CDLL(str(tmp_path / "narrow.so")))
    conv = _first_layer(3, 32)
    x, w = conv_pool._inputs(torch.randn(6, 3, 12, 10, generator=torch.Generator().manual_seed(3)), conv.weight, bf16=True)
    y, index = conv_pool._forward(x, w, True, keep_index=True)
    y_narrow, index_narrow = conv_pool._forward(x, w, True, keep_index=True, lib=narrow)
    assert torch.equal(y, y_narrow) and torch.equal(index, index_narrow)
    grad = torch.randn(y.shape).to(torch.bfloat16)
    torch.testing.assert_close(conv_pool._weight_grad(x, index, grad, True, lib=narrow), conv_pool._weight_grad(x, index, grad, True),
                               rtol=1e-6, atol=1e-6)


@needs_compiler
def test_a_nan_input_gives_nan_where_torchs_conv_and_pool_give_it():
    conv = _first_layer(1, 16)
    x = torch.randn(2, 1, 12, 12)
    x[0, 0, 5, 6] = float("nan")
    got = conv_pool.conv3x3_max_pool2(x, conv.weight)
    want = F.max_pool2d(conv(x), 2)
    assert got.isnan().any() and torch.equal(got.isnan(), want.isnan())


def test_convolutions_the_fused_kernel_does_not_take_are_refused():
    x = torch.randn(2, 1, 8, 8)
    assert not conv_pool.applies(x, torch.nn.Conv2d(1, 16, 3, padding=1))  # a bias
    assert not conv_pool.applies(x, torch.nn.Conv2d(1, 16, 3, padding=1, stride=2, bias=False))
    assert not conv_pool.applies(x, torch.nn.Conv2d(1, 16, 5, padding=2, bias=False))
    assert not conv_pool.applies(x, torch.nn.Conv2d(1, 24, 3, padding=1, bias=False))  # not a multiple of 16 channels
    assert not conv_pool.applies(torch.randn(2, 5, 8, 8), torch.nn.Conv2d(5, 16, 3, padding=1, bias=False))
    assert not conv_pool.applies(x.double(), torch.nn.Conv2d(1, 16, 3, padding=1, bias=False).double())
    assert not conv_pool.applies(x.requires_grad_(), torch.nn.Conv2d(1, 16, 3, padding=1, bias=False))  # wants an input gradient


@needs_compiler
def test_fastcnn_runs_its_first_conv_and_pool_fused_to_torchs_logits(monkeypatch):
    model = create_model("fastcnn", in_channels=1, num_classes=10, image_size=28, seed=0).to(memory_format=torch.channels_last)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    seen = []
    monkeypatch.setattr(bn_relu, "applies", lambda x, bn: False)  # the BatchNorm a module, to hook its input
    model.body[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].grad_fn.name()))
    fused = model(x)
    monkeypatch.setattr(conv_pool, "applies", lambda x, conv: False)
    plain = model(x)
    assert seen == ["_ConvMaxPool2Backward", "_MaxPool2Backward"]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    x.requires_grad_()  # an input gradient: the fused kernel gives none, so the layers run apart
    monkeypatch.undo()
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert grad.abs().sum() > 0


@needs_compiler
@pytest.mark.parametrize("kernel", ["conv_pool", "bn_relu", "conv_wgrad"])
def test_fastcnn_trains_with_each_native_kernel_as_with_torchs(kernel, monkeypatch):
    """Thirty bf16 steps on a learnable task with the kernel and without it (torch's layers): the same
    learning curve to bf16 noise, and the same fit.

    The step size keeps training out of the spiky regime, where bf16 rounding alone (oneDNN's too, or
    fp32 against bf16) moves single losses by tens of percent and the comparison would measure chaos."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=gen)
    y = (x[:, 0, 10:18, 10:18].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :14].mean((1, 2)) > 0).long()

    def losses() -> list[float]:
        model = create_model("fastcnn", in_channels=1, num_classes=4, image_size=28, seed=0).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        out = []
        for step in range(30):
            batch = slice(step % 4 * 64, step % 4 * 64 + 64)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            out.append(loss.item())
        return out

    if kernel == "conv_wgrad" and not _has_tiles():
        pytest.skip("no AMX on this CPU: oneDNN's weight gradient runs either way")
    fused = losses()
    monkeypatch.setattr({"bn_relu": bn_relu, "conv_pool": conv_pool, "conv_wgrad": conv_wgrad}[kernel], "applies",
                        lambda x, layer: False)
    plain = losses()
    assert abs(fused[0] - plain[0]) < 1e-2
    assert abs(sum(fused) - sum(plain)) < 0.05 * sum(plain)  # a wrong weight gradient moves this by half
    assert sum(plain[-8:]) < 0.1 and sum(fused[-8:]) < 0.1  # both fit


def _eval_batchnorm(channels: int, seed: int = 0) -> torch.nn.BatchNorm2d:
    """An eval-mode BatchNorm with trained-looking statistics and affine terms of both signs."""
    gen = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(channels, generator=gen) * 2 - 1)
        bn.running_var.copy_(torch.rand(channels, generator=gen) * 3 + 0.1)
        bn.weight.copy_(torch.rand(channels, generator=gen) * 4 - 2)
        bn.bias.copy_(torch.rand(channels, generator=gen) * 2 - 1)
    return bn


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 32, 14, 14), (512, 64, 7, 7), (3, 16, 7, 9), (2, 5, 2, 3), (160, 16, 28, 28)])
def test_inference_pool_applies_batchnorm_and_relu_as_torch(shape, dtype):
    bn = _eval_batchnorm(shape[1])
    x = _ties_and_nans(shape, dtype) + torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        want = F.relu(bn(F.max_pool2d(x, 2)))
        got = native.max_pool2(x, native.bn_relu_terms(bn))
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()  # a NaN in a window stays a NaN
    if dtype == torch.bfloat16:
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    else:  # torch's fp32 kernel itself rounds some outputs differently by shape (0-3 % of them): one step
        torch.testing.assert_close(got, want, rtol=2.4e-7, atol=1e-7, equal_nan=True)


@needs_compiler
@pytest.mark.parametrize("bf16", [True, False])
def test_inference_conv_and_pool_apply_batchnorm_and_relu_as_torch(bf16):
    conv, bn = _first_layer(1, 16), _eval_batchnorm(16)
    x = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    x[3, 0, 5, 6] = float("nan")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        want = F.relu(bn(conv_pool.conv3x3_max_pool2(x, conv.weight)))
        got = conv_pool.conv3x3_max_pool2(x, conv.weight, native.bn_relu_terms(bn))
    assert got.dtype == want.dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1024, 128, 3, 3), (300, 16, 4, 4), (3, 5, 2, 3), (2, 64, 7, 7)])
def test_inference_global_max_pool_applies_batchnorm_and_relu_as_torch(shape, dtype):
    bn = _eval_batchnorm(shape[1])  # scales of both signs: a negative one takes each channel's minimum
    assert (native.bn_relu_terms(bn)[0] < 0).any()
    x = _ties_and_nans(shape, dtype) + torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        want = F.adaptive_max_pool2d(F.relu(bn(x)), 1).flatten(1)
        got = native.bn_relu_global_max(x, native.bn_relu_terms(bn))
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()  # a NaN in a channel stays a NaN
    if dtype == torch.bfloat16:
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    else:  # torch's fp32 BatchNorm rounds some outputs differently by shape: one step
        torch.testing.assert_close(got, want, rtol=2.4e-7, atol=1e-7, equal_nan=True)


@needs_compiler
def test_batchnorm_terms_are_refused_where_a_gradient_is_wanted_or_they_do_not_fit():
    terms = native.bn_relu_terms(_eval_batchnorm(16))
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="for inference"):
        native.max_pool2(x.requires_grad_(), terms)
    with pytest.raises(ValueError, match="for inference"):
        native.bn_relu_global_max(x, terms)
    with torch.no_grad(), pytest.raises(ValueError, match="channels_last"):
        native.bn_relu_global_max(x.detach().contiguous(), terms)
    with pytest.raises(ValueError, match="for inference"):
        conv_pool.conv3x3_max_pool2(torch.randn(2, 1, 8, 8), _first_layer(1, 16).weight, terms)
    with torch.no_grad(), pytest.raises(ValueError, match="16 channels"):
        native.max_pool2(x, (terms[0][:8], terms[1][:8]))
    with torch.no_grad(), pytest.raises(ValueError, match="fp32"):
        native.max_pool2(x, (terms[0].double(), terms[1]))


@needs_compiler
@pytest.mark.parametrize("name", ["fastcnn", "fastcnn_l"])
def test_fastcnn_inference_folds_batchnorm_and_relu_into_its_pools_to_torchs_bits(name, monkeypatch):
    model = create_model(name, in_channels=1, num_classes=10, image_size=28, seed=0).to(memory_format=torch.channels_last)
    norms = [m for m in model.body if isinstance(m, torch.nn.BatchNorm2d)]
    for i, bn in enumerate(norms):
        bn.load_state_dict(_eval_batchnorm(bn.num_features, seed=i).state_dict())
    model.eval()
    calls = []
    for bn in norms:
        bn.register_forward_hook(lambda m, args, out: calls.append(m))
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x)
        assert calls == []  # the three after a pool ran inside the pool kernels, the last with the global max-pool
        monkeypatch.setattr(conv_pool, "applies", lambda x, conv: False)
        monkeypatch.setattr(native, "applies", lambda x: False)
        plain = model(x)
    assert torch.equal(fused, plain)
    monkeypatch.undo()
    model.train()  # training-mode BatchNorm normalises with the batch's statistics: nothing is folded
    plain_model = copy.deepcopy(model)
    with torch.no_grad():
        trained = model(x)
        monkeypatch.setattr(bn_relu, "applies", lambda x, bn: False)
        want = plain_model(x)
    torch.testing.assert_close(trained, want, rtol=1e-4, atol=1e-4)
    for bn, plain_bn in zip(norms, (m for m in plain_model.body if isinstance(m, torch.nn.BatchNorm2d))):
        torch.testing.assert_close(bn.running_var, plain_bn.running_var)  # moved from the eval statistics alike


def _batchnorm(channels: int, seed: int = 0, **kwargs) -> torch.nn.BatchNorm2d:
    """A training-mode BatchNorm with running statistics and affine terms of both signs."""
    bn = _eval_batchnorm(channels, seed) if kwargs.get("affine", True) else torch.nn.BatchNorm2d(channels, affine=False)
    fresh = torch.nn.BatchNorm2d(channels, **kwargs)
    fresh.load_state_dict(bn.state_dict(), strict=False)
    return fresh.train()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _check_against_float64(x: torch.Tensor, bn: torch.nn.BatchNorm2d, grad_tol: float, out_tol: float) -> None:
    """batch_norm_relu(x, bn) against torch's BatchNorm and ReLU in float64 on the same values: the
    output, every gradient and the running statistics. The reference's ReLU takes the kernel's mask,
    so that an output within rounding of zero cannot flip it and move one gradient by a whole value."""
    ref = copy.deepcopy(bn).double()
    x = x.requires_grad_()
    assert bn_relu.applies(x, bn)
    y = bn_relu.batch_norm_relu(x, bn)
    assert y.grad_fn.name() == "_BatchNormReLUBackward" and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    xd = x.detach().double().requires_grad_()
    pre = ref(xd)
    assert _rel_err(y, F.relu(pre)) < out_tol
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x.dtype)
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    got = torch.autograd.grad(y, [x, *params], grad)
    want = torch.autograd.grad(pre, [xd, *[p for p in (ref.weight, ref.bias) if p is not None]], grad.double() * (y != 0))
    assert _rel_err(got[0], want[0]) < grad_tol
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == torch.float32 and _rel_err(g, w) < 1e-5
    assert bn.num_batches_tracked == ref.num_batches_tracked == 1
    assert _rel_err(bn.running_mean, ref.running_mean) < 1e-6 and _rel_err(bn.running_var, ref.running_var) < 1e-6


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 16, 14, 14), (96, 64, 3, 3), (3, 5, 7, 9), (3, 24, 1, 2)])
def test_training_batchnorm_and_relu_give_torchs_values_gradients_and_running_statistics(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 3
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    bf16 = dtype == torch.bfloat16
    _check_against_float64(x, _batchnorm(shape[1]), grad_tol=4e-3 if bf16 else 1e-5, out_tol=4e-3 if bf16 else 1e-6)


@needs_compiler
def test_training_batchnorm_statistics_keep_their_precision_when_the_mean_is_large():
    """fp32 values around 300 with a spread of 1: a sum of squares minus the squared mean would lose
    about 1 % of the variance in fp32; the shifted sums keep it to fp32 rounding."""
    x = (torch.randn(512, 16, 7, 7, generator=torch.Generator().manual_seed(2)) + 300).contiguous(memory_format=torch.channels_last)
    _check_against_float64(x, _batchnorm(16), grad_tol=1e-4, out_tol=1e-5)


@needs_compiler
def test_training_batchnorm_without_affine_terms_or_running_statistics_is_torchs():
    x = torch.randn(64, 16, 5, 5, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=torch.channels_last)
    for bn in (torch.nn.BatchNorm2d(16, affine=False), torch.nn.BatchNorm2d(16, track_running_stats=False)):
        assert bn_relu.applies(x, bn)
        got = bn_relu.batch_norm_relu(x.requires_grad_(), bn)
        (grad_got,) = torch.autograd.grad(got.sum(), x)
        want = F.relu(copy.deepcopy(bn)(x))
        (grad_want,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-5)
    assert bn.running_mean is None and bn.num_batches_tracked is None


@needs_compiler
def test_training_batchnorm_keeps_a_cumulative_average_where_momentum_is_none():
    bn = _batchnorm(8, momentum=None)
    want = copy.deepcopy(bn)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = (torch.randn(32, 8, 4, 4, generator=gen) * 3 + 1).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            bn_relu.batch_norm_relu(x, bn)
            want(x)
    assert bn.num_batches_tracked == want.num_batches_tracked == 3
    torch.testing.assert_close(bn.running_mean, want.running_mean)
    torch.testing.assert_close(bn.running_var, want.running_var)


def test_batchnorms_the_kernel_does_not_take_are_refused():
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(8)
    assert not bn_relu.applies(x, copy.deepcopy(bn).eval())  # running statistics: inference folds them (above)
    assert not bn_relu.applies(torch.randn(4, 8, 5, 5), bn)  # NCHW
    assert not bn_relu.applies(x.double(), bn)
    assert not bn_relu.applies(x, copy.deepcopy(bn).double())
    assert not bn_relu.applies(torch.randn(1, 8, 1, 1), bn)  # one value per channel: torch's error
    assert not bn_relu.applies(x, torch.nn.BatchNorm1d(8))
    assert not bn_relu.applies(x, torch.nn.BatchNorm2d(4))


@needs_compiler
def test_fastcnn_trains_its_batchnorms_in_the_kernel(monkeypatch):
    model = create_model("fastcnn", in_channels=1, num_classes=10, image_size=28, seed=0).to(memory_format=torch.channels_last)
    seen = []
    for i, layer in enumerate(model.body):
        if isinstance(layer, torch.nn.Conv2d) and i:
            layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].grad_fn.name()))
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen == ["_BatchNormReLUBackward"] * 3
    assert all(bn.num_batches_tracked == 1 for bn in model.modules() if isinstance(bn, torch.nn.BatchNorm2d))


@needs_compiler
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
@pytest.mark.parametrize("shape,padding,flip_p", [
    ((64, 1, 28, 28), 2, 0.5),     # the engine's weak view
    ((300, 3, 32, 32), 4, 0.5),    # split over two threads
    ((16, 3, 9, 5), 3, 1.0),       # not square, every sample mirrored
    ((16, 1, 4, 6), 7, 0.5),       # shifts past the far edge: reflected more than once, or all zero
    ((8, 3, 2, 2), 1, 0.0),        # the smallest image a reflection takes, no mirror
])
def test_the_weak_views_crop_kernel_gives_torchs_bytes(monkeypatch, shape, padding, flip_p, mode):
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert views.applies(x)
    got = augment.pad_crop(x, torch.Generator().manual_seed(1), padding=padding, mode=mode, flip_p=flip_p)
    monkeypatch.setattr(views, "applies", lambda x: False)
    want = augment.pad_crop(x, torch.Generator().manual_seed(1), padding=padding, mode=mode, flip_p=flip_p)
    assert torch.equal(got, want)


@needs_compiler
@pytest.mark.parametrize("shape,size,fill", [((64, 1, 28, 28), (1, 14), None), ((300, 3, 32, 32), (1, 16), None),
                                             ((32, 3, 5, 9), (3, 12), 0), ((32, 1, 6, 6), 20, 255)])
def test_the_cutout_kernel_gives_torchs_bytes(monkeypatch, shape, size, fill):
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = augment.cutout(x, torch.Generator().manual_seed(1), size=size, fill=fill)
    monkeypatch.setattr(views, "applies", lambda x: False)
    want = augment.cutout(x, torch.Generator().manual_seed(1), size=size, fill=fill)
    assert torch.equal(got, want) and not torch.equal(got, x)
    assert torch.equal(x, torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))


def _colour_test_images(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    elif kind == "flat":  # autocontrast's and equalize's degenerate cases: one value per image
        x = torch.randint(0, 256, (shape[0], 1, 1, 1), dtype=torch.uint8, generator=gen).expand(shape).contiguous()
    else:  # "saturated": 0 and 255 only, and few distinct values
        x = (torch.randint(0, 2, shape, generator=gen) * 255).to(torch.uint8)
    return x if dtype == torch.uint8 else x.float() / 255.0


@needs_compiler
@pytest.mark.parametrize("op", augment.COLOR_OPS + ("all",))
@pytest.mark.parametrize("shape", [(96, 1, 28, 28), (64, 3, 32, 32), (300, 1, 9, 5), (40, 3, 2, 3)])
@pytest.mark.parametrize("kind,dtype", [("random", torch.uint8), ("random", torch.float32), ("flat", torch.uint8),
                                        ("saturated", torch.uint8)])
def test_the_colour_ops_kernel_gives_torchs_bits(monkeypatch, op, shape, kind, dtype):
    """Every RandAugment colour op alone (two rounds: the second on the first's fractional values) and
    the whole pool, 1 and 3 channels, uint8 and float, images split over two threads, images too small
    for sharpness's filter, flat and saturated images: the native round gives torch's path's bits."""
    x = _colour_test_images(kind, shape, dtype)
    ops = augment.DEFAULT_OPS if op == "all" else (op, "brightness")
    calls = []
    monkeypatch.setattr(views, "colour_ops", lambda *a, f=views.colour_ops: calls.append(1) or f(*a))
    got = [augment.randaugment(x, torch.Generator().manual_seed(s), ops=ops) for s in range(3)]
    assert calls  # the native rounds ran
    monkeypatch.setattr(views, "colour_ops_apply", lambda x: False)
    want = [augment.randaugment(x, torch.Generator().manual_seed(s), ops=ops) for s in range(3)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_compiler
def test_the_colour_ops_kernel_refuses_what_it_does_not_take():
    x = torch.rand(4, 3, 8, 8) * 255
    assert views.colour_ops_apply(x)
    assert not views.colour_ops_apply(x.double())            # fp32 only: torch's ops
    assert not views.colour_ops_apply(x[:, :2])              # 1 or 3 channels
    assert not views.colour_ops_apply(x.transpose(2, 3))     # not contiguous
    with pytest.raises(ValueError, match="op, param and mean"):
        views.colour_ops(x, torch.zeros(3, dtype=torch.int32), torch.zeros(4), torch.zeros(4))


@needs_compiler
@pytest.mark.parametrize("bad", [300.0, -2.0, float("nan")])
def test_equalize_on_pixels_outside_0_255_fails_as_torchs_path_does_instead_of_writing_past_its_histogram(
        monkeypatch, bad):
    x = torch.rand(4, 1, 8, 8)
    x[2, 0, 3, 3] = bad / 255  # a float image outside [0, 1]
    with pytest.raises(ValueError, match="equalize needs pixels in 0..255"):
        augment.randaugment(x, torch.Generator().manual_seed(0), ops=("equalize",))
    monkeypatch.setattr(views, "colour_ops_apply", lambda x: False)
    with pytest.raises(RuntimeError, match="out of bounds"):
        augment.randaugment(x, torch.Generator().manual_seed(0), ops=("equalize",))


def test_batches_the_view_kernels_do_not_take_are_refused():
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    assert not views.applies(x.float())                           # [0, 1] floats: torch's ops
    assert not views.applies(x[:, :, :, ::2])                      # not contiguous
    assert not views.applies(torch.zeros(4, 1, 1, 8, dtype=torch.uint8))  # a reflection needs two pixels
    assert not views.applies(x[0])
    with pytest.raises(ValueError, match="shift"):
        views.pad_crop(x, torch.zeros(2, 3, dtype=torch.int64), None, reflect=True)
    with pytest.raises(ValueError, match="2x2"):  # the fold would never end
        views.pad_crop(torch.zeros(4, 1, 1, 8, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.int64), None, reflect=True)
    with pytest.raises(ValueError, match="fill"):
        views.cutout(x, *torch.zeros(3, 4, dtype=torch.int64), fill=300)
    out = augment.cutout(x, torch.Generator().manual_seed(0), size=3, fill=0.5)  # a fill no byte holds: torch's
    assert out.dtype == torch.uint8


def _has_tiles() -> bool:
    return conv_wgrad.applies(torch.empty(1, 16, 7, 7), torch.empty(32, 16, 3, 3))


needs_tiles = pytest.mark.skipif(not _has_tiles(), reason="no AMX on this CPU (or no C compiler): oneDNN's weight gradient runs")


def _weight_grad_f64(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The exact weight gradient of the bf16 operands (their products and sums in float64)."""
    w = torch.zeros(grad.shape[1], x.shape[1], 3, 3, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(grad.double(), x.double(), w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                               1, [False, True, False])[1]


@needs_tiles
@pytest.mark.parametrize("n,c,o,h,w", [(1, 16, 32, 7, 7), (5, 32, 64, 14, 14), (3, 16, 32, 5, 6), (2, 32, 32, 16, 16),
                                       (9, 16, 64, 1, 1), (37, 48, 96, 3, 4),
                                       (160, 16, 32, 7, 7),  # odd rows, 16-wide rows, blocks of 8 images, two threads
                                       (11, 4, 8, 14, 14), (13, 8, 16, 6, 6), (4, 3, 5, 6, 6), (9, 12, 16, 16, 16),
                                       (7, 16, 48, 7, 7), (10, 32, 16, 3, 3), (3, 1, 16, 28, 28)])  # fewer than 16 channels,
def test_the_tile_weight_gradient_is_the_fp32_sum_of_exact_products(n, c, o, h, w):  # a last 16; short last blocks
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, c, h, w, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, o, h, w, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    got = conv_wgrad.conv3x3_weight_grad(x, grad)
    exact = _weight_grad_f64(x, grad)
    assert got.dtype == torch.float32 and got.shape == (o, c, 3, 3)
    assert float((got.double() - exact).norm() / exact.norm()) < 2e-6  # oneDNN's bf16 output: 1.7e-3
    assert float((got.double() - exact).abs().max()) < 1e-5 * float(exact.abs().max()) + 1e-6
    weight, bias = conv_wgrad.conv3x3_weight_and_bias_grad(x, grad)
    assert torch.equal(weight, got)  # the bias's sums change nothing else
    sums = grad.double().sum((0, 2, 3))
    assert bias.dtype == torch.float32 and bias.shape == (o,)
    assert float((bias.double() - sums).abs().max()) < 1e-5 * float(sums.abs().max()) + 1e-5


@needs_tiles
def test_the_tile_weight_gradient_takes_nchw_and_fp32_operands_as_their_bf16_values():
    gen = torch.Generator().manual_seed(0)
    x, grad = torch.randn(4, 16, 7, 7, generator=gen), torch.randn(4, 32, 7, 7, generator=gen)
    want = conv_wgrad.conv3x3_weight_grad(x.bfloat16().contiguous(memory_format=torch.channels_last),
                                          grad.bfloat16().contiguous(memory_format=torch.channels_last))
    assert torch.equal(conv_wgrad.conv3x3_weight_grad(x, grad), want)


@needs_tiles
def test_a_nan_in_the_input_makes_its_channels_taps_nan_and_leaves_the_rest_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 7, 7, generator=gen).bfloat16()
    x[1, 5, 0, 0] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 32, 7, 7, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    got, exact = conv_wgrad.conv3x3_weight_grad(x, grad), _weight_grad_f64(x, grad)
    assert got.isnan()[exact.isnan()].all()  # every tap that reads the NaN (the padding may add taps of its channel)
    assert not got.isnan()[:, [c for c in range(16) if c != 5]].any()
    clean = torch.ones(16, dtype=torch.bool)
    clean[5] = False
    assert torch.allclose(got[:, clean].double(), exact[:, clean], rtol=1e-5, atol=1e-5)


@needs_compiler
def test_convolutions_the_tile_weight_gradient_does_not_take_are_refused():
    x = torch.randn(2, 16, 7, 7)
    assert not conv_wgrad.applies(torch.randn(2, 24, 7, 7), torch.empty(32, 24, 3, 3))  # input channels past 16, not 16k
    assert not conv_wgrad.applies(x, torch.empty(40, 16, 3, 3))  # output channels past 16, not 16k
    assert not conv_wgrad.applies(x, torch.empty(32, 16, 5, 5))  # not 3x3
    assert not conv_wgrad.applies(x, torch.empty(32, 32, 3, 3))  # channels that do not match
    with pytest.raises(ValueError, match="multiple of 16"):
        conv_wgrad.conv3x3_weight_grad(x, torch.randn(2, 32, 7, 6))


@needs_tiles
@pytest.mark.parametrize("c,o,size,bias", [(32, 64, 7, False), (32, 64, 3, False), (64, 128, 3, False), (4, 8, 14, True)])
def test_fastcnn_convs_train_with_the_tile_weight_gradient_and_onednns_values(c, o, size, bias):
    from semiprune_core.models.fastcnn import Conv3x3  # 3x3 maps: the tiles, not the small-map product

    gen = torch.Generator().manual_seed(0)
    conv, ref = Conv3x3(c, o, bias=bias), torch.nn.Conv2d(c, o, 3, padding=1, bias=bias)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(24, c, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(24, o, size, size, generator=gen).bfloat16()
    outs = []
    for layer in (conv, ref):
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xg)
        y.backward(grad.to(y.dtype))
        outs.append((y, xg.grad))
    (y, gx), (y_ref, gx_ref) = outs
    assert y.grad_fn.name() == "_NativeWeightGradConvBackward"  # the tile path ran
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)  # oneDNN's forward and input gradient
    exact = _weight_grad_f64(x.bfloat16(), grad)
    assert conv.weight.grad.dtype == torch.float32
    assert float((conv.weight.grad.double() - exact).norm() / exact.norm()) < 2e-6
    assert float((ref.weight.grad.double() - exact).norm() / exact.norm()) < 4e-3  # oneDNN's, rounded to bf16
    if bias:
        sums = grad.double().sum((0, 2, 3))
        assert conv.bias.grad.dtype == torch.float32
        assert float((conv.bias.grad.double() - sums).norm() / sums.norm()) < 1e-6
        assert torch.allclose(conv.bias.grad, ref.bias.grad.float(), rtol=1e-2, atol=1e-2)


def test_wide_convs_on_small_maps_keep_the_matrix_product_where_it_beat_the_tiles():
    from semiprune_core.models.fastcnn import SMALL_MAP_MIN_WORK, TILE_MAX_PAIRS_ON_SMALL_MAPS, Conv3x3

    conv = Conv3x3(128, 256)  # fastcnn_l's last stage
    assert 128 * 256 > TILE_MAX_PAIRS_ON_SMALL_MAPS
    x = torch.randn(SMALL_MAP_MIN_WORK // (128 * 256) + 1, 128, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x.requires_grad_(True)).grad_fn.name() == "_SmallMapConvBackward"
        # too little work for the product: the tiles where the CPU has them, else oneDNN's kernel
        assert conv(x[:2]).grad_fn.name() == ("_NativeWeightGradConvBackward" if _has_tiles() else "ConvolutionBackward0")


@needs_compiler
def test_without_amx_convs_keep_onednns_weight_gradient_and_reports_say_the_kernel_did_not_run(monkeypatch):
    from semiprune_core.models.fastcnn import Conv3x3

    monkeypatch.setattr(conv_wgrad, "_library", lambda: None)  # what a CPU without AMX gives
    assert "conv_wgrad" not in kernels.available()
    x = torch.randn(4, 32, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = Conv3x3(32, 64)(x)
    assert y.grad_fn.name() == "ConvolutionBackward0"


# --- the fp32 weight gradient (AVX2) ---------------------------------------------------------------

def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).norm() / exact.norm())


def _has_f32_wgrad() -> bool:
    return conv_wgrad_f32.applies(torch.empty(1, 16, 7, 7), torch.empty(32, 16, 3, 3))


needs_f32_wgrad = pytest.mark.skipif(not _has_f32_wgrad(),
                                     reason="no AVX2 and FMA, or AVX-512, on this CPU (or no C compiler): oneDNN's weight gradient runs")


@needs_f32_wgrad
@pytest.mark.parametrize("n,c,o,h,w", [
    (3, 16, 32, 14, 14),  # fastcnn's: two 16-channel blocks of g, channel blocks of 6, 6, 4
    (2, 4, 8, 14, 14),  # fastcnn_s's stem: one 8-channel vector
    (5, 5, 24, 6, 7),  # a last block of 8 output channels, one input block of 5, a row shorter than the map
    (4, 13, 40, 28, 28),  # rows taken a few at a time (a map past a block's positions)
    (70, 32, 64, 3, 3),  # more images than a row has positions: the loop runs across images
    (40, 7, 16, 1, 1),  # a single pixel: every tap but the centre reads padding
    (9, 3, 8, 2, 3),
])
def test_the_fp32_weight_gradient_is_the_convolutions_to_fp32_rounding(n, c, o, h, w):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, o, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    exact = _weight_grad_f64(x, grad)
    got = conv_wgrad_f32.conv3x3_weight_grad(x, grad)
    assert got.dtype == torch.float32 and got.shape == (o, c, 3, 3)
    assert _relative_error(got, exact) < 1e-6  # fp32 sums (a wrong tap or channel gives about 1)
    weight, bias = conv_wgrad_f32.conv3x3_weight_and_bias_grad(x, grad)
    assert torch.equal(weight, got)  # the bias's sums change nothing else
    sums = grad.double().sum((0, 2, 3))
    assert bias.shape == (o,) and _relative_error(bias, sums) < 1e-6
    # nchw operands, and the same bits on one thread as on two (each thread's part is summed apart)
    assert torch.equal(conv_wgrad_f32.conv3x3_weight_grad(x.contiguous(), grad.contiguous()), got)


@needs_f32_wgrad
def test_the_fp32_weight_gradient_of_a_large_batch_sums_every_threads_part():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(300, 32, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    exact = _weight_grad_f64(x, grad)
    for threads in (1, 2, 3):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = conv_wgrad_f32.conv3x3_weight_grad(x, grad)
        finally:
            torch.set_num_threads(before)
        assert _relative_error(got, exact) < 1e-5, threads  # 14,700 fp32 terms per sum on one thread


@needs_compiler
def test_convolutions_the_fp32_weight_gradient_does_not_take_are_refused():
    x = torch.randn(2, 16, 7, 7)
    assert not conv_wgrad_f32.applies(x, torch.empty(20, 16, 3, 3))  # output channels not a multiple of 8
    assert not conv_wgrad_f32.applies(x.bfloat16(), torch.empty(32, 16, 3, 3))  # bf16
    assert not conv_wgrad_f32.applies(x, torch.empty(32, 16, 5, 5))  # not 3x3
    with pytest.raises(ValueError, match="multiple of 8"):
        conv_wgrad_f32.conv3x3_weight_grad(x, torch.randn(2, 20, 7, 7))
    with pytest.raises(ValueError, match="fp32"):
        conv_wgrad_f32.conv3x3_weight_grad(x.bfloat16(), torch.randn(2, 32, 7, 7))


@needs_f32_wgrad
@pytest.mark.parametrize("c,o,size,bias", [(16, 32, 14, False), (32, 64, 7, False), (32, 64, 3, True), (64, 128, 3, False)])
def test_fastcnn_convs_train_in_fp32_with_the_native_weight_gradient_and_onednns_values(c, o, size, bias):
    from semiprune_core.models.fastcnn import SMALL_MAP_MIN_WORK, Conv3x3

    gen = torch.Generator().manual_seed(0)
    conv, ref = Conv3x3(c, o, bias=bias), torch.nn.Conv2d(c, o, 3, padding=1, bias=bias)
    ref.load_state_dict(conv.state_dict())
    n = 24
    assert n * c * o < SMALL_MAP_MIN_WORK  # too little work for the small-map product
    x = torch.randn(n, c, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, o, size, size, generator=gen)
    outs = []
    for layer in (conv, ref):
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.backward(grad)
        outs.append((y, xg.grad))
    (y, gx), (y_ref, gx_ref) = outs
    assert y.grad_fn.name() == "_NativeWeightGradConvBackward"  # the native path ran
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)  # oneDNN's forward and input gradient
    exact = _weight_grad_f64(x, grad)
    assert conv.weight.grad.dtype == torch.float32
    assert _relative_error(conv.weight.grad, exact) < 1e-6
    if bias:
        assert _relative_error(conv.bias.grad, grad.double().sum((0, 2, 3))) < 1e-6


@needs_compiler
def test_fp32_convs_keep_onednns_weight_gradient_where_the_native_one_lost_or_cannot_run(monkeypatch):
    from semiprune_core.models.fastcnn import F32_MIN_INPUT_CHANNELS, SMALL_MAP_MIN_WORK, Conv3x3

    def backward_name(layer, x, **autocast):
        with torch.autocast("cpu", **autocast):
            return layer(x.contiguous(memory_format=torch.channels_last).requires_grad_(True)).grad_fn.name()

    few = F32_MIN_INPUT_CHANNELS // 2
    assert backward_name(Conv3x3(few, 16), torch.randn(4, few, 14, 14), enabled=False) == "ConvolutionBackward0"
    assert backward_name(Conv3x3(16, 20), torch.randn(4, 16, 7, 7), enabled=False) == "ConvolutionBackward0"
    frozen = Conv3x3(16, 32).requires_grad_(False)
    assert backward_name(frozen, torch.randn(4, 16, 7, 7), enabled=False) == "ConvolutionBackward0"
    # the small-map product takes fp32 small maps with enough work, as it takes bf16 ones
    big = SMALL_MAP_MIN_WORK // (32 * 64) + 1
    assert backward_name(Conv3x3(32, 64), torch.randn(big, 32, 3, 3), enabled=False) == "_SmallMapConvBackward"
    monkeypatch.setattr(conv_wgrad_f32, "_library", lambda: None)  # a CPU it was not built for
    assert "conv_wgrad_f32" not in kernels.available()
    assert backward_name(Conv3x3(16, 32), torch.randn(4, 16, 7, 7), enabled=False) == "ConvolutionBackward0"
