"""Native CPU kernels: the same bits as torch's kernels, built once per machine, torch's where none builds."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from semiprune_core import kernels
from semiprune_core.kernels import maxpool2 as native
from semiprune_core.models import create_model
from semiprune_core.models.fastcnn import MaxPool2

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


@needs_compiler
def test_processes_building_at_once_each_load_a_whole_library(tmp_path):
    code = "from semiprune_core import kernels; assert kernels.load('maxpool2') is not None"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert len(list((tmp_path / "semiprune/kernels").glob("maxpool2-*.so"))) == 1
    assert not list((tmp_path / "semiprune/kernels").glob(".*.tmp"))
