"""The weight gradient of a bf16 3x3 convolution on Intel AMX tiles, through ``conv_wgrad.c``.

``conv3x3_weight_grad(x, grad)`` is what ``torch.ops.aten.convolution_backward`` gives for the
weight of ``F.conv2d(x, weight, padding=1)``, summed in fp32 from the exact products of the bf16
values (oneDNN's bf16 kernel rounds it to bf16), 2.3x as fast as oneDNN's at 32 -> 64 channels on
7x7 maps. A NaN or infinity in ``x`` makes every tap of its channel NaN (oneDNN's: the taps that read
it): training has diverged either way. It applies where the CPU has AMX and the kernel was built for it; elsewhere callers keep
torch's kernel.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import load


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load("conv_wgrad")
    if lib is None:
        return None
    lib.conv3x3_wgrad.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    lib.conv3x3_wgrad.restype = lib.conv3x3_wgrad_ready.restype = ctypes.c_int
    return lib if lib.conv3x3_wgrad_ready() else None  # built without AMX, or the OS does not grant it


def _tiled(channels: int) -> bool:
    """A count of channels the tiles take: a multiple of 16, or up to 16 (one partly used tile)."""
    return channels % 16 == 0 or 0 < channels < 16


def applies(x: Tensor, weight: Tensor) -> bool:
    """A 4-d CPU ``x`` into a 3x3 ``weight`` with input and output channels each a multiple of 16 or at
    most 16, outside ``torch.compile``, on a machine whose CPU and kernel have AMX."""
    return (x.device.type == "cpu" and x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3)
            and x.shape[1] == weight.shape[1] and _tiled(x.shape[1]) and _tiled(weight.shape[0])
            and not torch.compiler.is_compiling() and _library() is not None)


def conv3x3_weight_grad(x: Tensor, grad: Tensor) -> Tensor:
    """The fp32 gradient (O, C, 3, 3) of a stride-1, padding-1 3x3 convolution's weight, from its bf16
    input ``x`` (N, C, H, W) and its output's gradient ``grad`` (N, O, H, W)."""
    return _gradients(x, grad, bias=False)[0]


def conv3x3_weight_and_bias_grad(x: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`conv3x3_weight_grad` and the bias's fp32 gradient (O,), ``grad`` summed per channel as the
    kernel lays it out (torch's own sum of a channels-last tensor took a third of the weight's time)."""
    return _gradients(x, grad, bias=True)


def _gradients(x: Tensor, grad: Tensor, *, bias: bool) -> tuple[Tensor, Tensor | None]:
    n, c, h, w = x.shape
    o = grad.shape[1]
    if grad.shape != (n, o, h, w) or not _tiled(c) or not _tiled(o):
        raise ValueError(f"conv3x3_weight_grad needs x (N, C, H, W) and grad (N, O, H, W) with C and O each a "
                         f"multiple of 16 or at most 16, got {tuple(x.shape)} and {tuple(grad.shape)}")
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    grad = grad.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    return summed_parts(_library().conv3x3_wgrad, x, grad, bias=bias)


def summed_parts(kernel, x: Tensor, grad: Tensor, *, bias: bool) -> tuple[Tensor, Tensor | None]:
    """Run a weight-gradient ``kernel`` (``conv3x3_wgrad``'s arguments) on channels-last ``x`` and ``grad``
    with one part of the sums per thread, and add the parts up: the weight's (O, C, 3, 3) and, with
    ``bias``, the bias's (O,)."""
    n, c, h, w = x.shape
    o = grad.shape[1]
    threads = torch.get_num_threads()
    parts = torch.empty((threads, 3, 3, c, o), dtype=torch.float32)
    bias_parts = torch.empty((threads, o), dtype=torch.float32) if bias else None
    used = kernel(x.data_ptr(), grad.data_ptr(), parts.data_ptr(), None if bias_parts is None else bias_parts.data_ptr(),
                  n, h, w, c, o, threads)
    if used < 0:
        raise MemoryError("conv3x3_weight_grad could not allocate its buffers")
    return parts[:used].sum(0).permute(3, 2, 0, 1).contiguous(), None if bias_parts is None else bias_parts[:used].sum(0)
