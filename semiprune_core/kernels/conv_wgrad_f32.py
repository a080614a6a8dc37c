"""The weight gradient of an fp32 3x3 convolution with AVX2 FMA, through ``conv_wgrad_f32.c``.

``conv3x3_weight_grad(x, grad)`` is what ``torch.ops.aten.convolution_backward`` gives for the weight
of ``F.conv2d(x, weight, padding=1)`` in fp32, summed in another order. It applies where the CPU has
AVX2 and FMA but not AVX-512 (where oneDNN's kernel has twice the vector width) and the kernel was
built; elsewhere callers keep torch's kernel.

Two cores of an AMD EPYC (Zen 3, AVX2), batch 512, against oneDNN's kernel alternated per call
(``benchmarks/bench_kernels.py`` section (i)): 16 -> 32 channels at 14x14 1.15-1.3x, 32 -> 64 at 7x7
1.2-1.3x, 64 -> 128 at 3x3 1.2-1.6x; layers of fewer than 16 input channels lost (4 -> 8 at 14x14 0.6x).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import load
from .conv_wgrad import summed_parts


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load("conv_wgrad_f32")
    if lib is None:
        return None
    lib.conv3x3_wgrad_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    lib.conv3x3_wgrad_f32.restype = lib.conv3x3_wgrad_f32_ready.restype = ctypes.c_int
    return lib if lib.conv3x3_wgrad_f32_ready() else None  # built without AVX2 and FMA, or with AVX-512


def applies(x: Tensor, weight: Tensor) -> bool:
    """A 4-d fp32 CPU ``x`` into a 3x3 fp32 ``weight`` with a multiple of 8 output channels, outside
    ``torch.compile``, on a machine where the kernel was built (AVX2 and FMA, no AVX-512)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 4
            and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and x.shape[1] == weight.shape[1]
            and weight.shape[0] % 8 == 0 and not torch.compiler.is_compiling() and _library() is not None)


def conv3x3_weight_grad(x: Tensor, grad: Tensor) -> Tensor:
    """The gradient (O, C, 3, 3) of a stride-1, padding-1 3x3 convolution's weight, from its fp32 input
    ``x`` (N, C, H, W) and its output's gradient ``grad`` (N, O, H, W)."""
    return _gradients(x, grad, bias=False)[0]


def conv3x3_weight_and_bias_grad(x: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`conv3x3_weight_grad` and the bias's gradient (O,), ``grad`` summed per channel."""
    return _gradients(x, grad, bias=True)


def _gradients(x: Tensor, grad: Tensor, *, bias: bool) -> tuple[Tensor, Tensor | None]:
    n, c, h, w = x.shape
    o = grad.shape[1]
    if grad.shape != (n, o, h, w) or o % 8 or x.dtype != torch.float32 or grad.dtype != torch.float32:
        raise ValueError(f"conv3x3_weight_grad needs fp32 x (N, C, H, W) and grad (N, O, H, W) with O a multiple "
                         f"of 8, got {tuple(x.shape)} {x.dtype} and {tuple(grad.shape)} {grad.dtype}")
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    return summed_parts(_library().conv3x3_wgrad_f32, x, grad, bias=bias)
