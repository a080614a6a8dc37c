"""A network's first 3x3 convolution fused with the 2x2 max-pool after it, on the CPU (``conv_pool.c``).

``conv3x3_max_pool2(x, weight)`` is ``F.max_pool2d(F.conv2d(x, weight, padding=1), 2)``, forward and
weight gradient, without the full-resolution activation: on ``fastcnn``'s first layer (1 -> 16
channels at 28x28) the convolution, the pool and their backward were about a quarter of a bf16
training step, and half of inference, on two cores of an Intel Xeon. Under CPU bf16 autocast it
computes what autocast's oneDNN convolution computes (bf16 inputs and weights, fp32 sums, bf16
outputs) but sums in its own order, so an output can differ by one bf16 rounding step, and then a
window's maximum can sit elsewhere; in fp32 the outputs agree to fp32 rounding. The input gets no gradient: it is the network's input.
In inference, ``bn_relu=(scale, shift)`` also applies an eval-mode BatchNorm and a ReLU to the pooled
values as they are written (:func:`maxpool2.bn_relu_terms`).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from . import load
from .maxpool2 import checked_terms

#: Bounds that keep the kernel's stack buffers small: first layers of image networks are well inside.
MAX_IN_CHANNELS, MAX_WIDTH = 4, 1024


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give the library's functions their C signatures (ctypes would pass 64-bit sizes wrongly)."""
    sizes = [ctypes.c_int64] * 5 + [ctypes.c_int, ctypes.c_int]
    lib.conv_pool_forward.argtypes = [ctypes.c_void_p] * 6 + sizes
    lib.conv_pool_backward_weight.argtypes = [ctypes.c_void_p] * 4 + sizes
    lib.conv_pool_forward.restype = lib.conv_pool_backward_weight.restype = None
    return lib


def _library() -> ctypes.CDLL | None:
    lib = load("conv_pool")
    if lib is not None and lib.conv_pool_forward.argtypes is None:
        declare(lib)
    return lib


def _bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def applies(x: Tensor, conv: nn.Conv2d) -> bool:
    """``conv`` is a 3x3 convolution (stride 1, padding 1, no bias, dilation 1, one group) of up to
    :data:`MAX_IN_CHANNELS` into a multiple of 16 channels (the kernel's widest vector), and ``x`` a
    4-d fp32 CPU input to it (or bf16 under bf16 autocast) that needs no gradient, at least 2x2 and
    at most :data:`MAX_WIDTH` wide, outside ``torch.compile``, on a machine where the kernel was
    built."""
    return (x.device.type == "cpu" and x.dim() == 4 and not x.requires_grad and conv.bias is None
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _bf16()))
            and conv.weight.dtype == torch.float32 and conv.weight.device.type == "cpu"
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.shape[1] == conv.in_channels <= MAX_IN_CHANNELS and conv.out_channels % 16 == 0
            and 2 <= x.shape[-2] and 2 <= x.shape[-1] <= MAX_WIDTH
            and not torch.compiler.is_compiling() and _library() is not None)


def _inputs(x: Tensor, weight: Tensor, bf16: bool) -> tuple[Tensor, Tensor]:
    """x as (N, H, W, CI) in the storage type, the weights as (3, 3, CI, CO) fp32 holding its values."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = x.detach().to(dtype).permute(0, 2, 3, 1).contiguous()
    w = weight.detach().to(dtype).float().permute(2, 3, 1, 0).contiguous()
    return x, w


def _forward(x: Tensor, w: Tensor, bf16: bool, keep_index: bool, lib: ctypes.CDLL | None = None,
             bn_relu: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    n, h, wd, ci = x.shape
    co = w.shape[-1]
    y = torch.empty((n, co, h // 2, wd // 2), dtype=x.dtype, memory_format=torch.channels_last)
    index = torch.empty((n, h // 2, wd // 2, co), dtype=torch.uint8) if keep_index else None
    scale, shift = (None, None) if bn_relu is None else (t.data_ptr() for t in checked_terms(bn_relu, co))
    (lib or _library()).conv_pool_forward(x.data_ptr(), w.data_ptr(), y.data_ptr(), None if index is None else index.data_ptr(),
                                          scale, shift, n, h, wd, ci, co, bf16, torch.get_num_threads())
    return y, index


class _ConvMaxPool2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bf16: bool) -> Tensor:
        x, w = _inputs(x, weight, bf16)
        y, index = _forward(x, w, bf16, keep_index=True)
        ctx.save_for_backward(x, index)
        ctx.bf16 = bf16
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        x, index = ctx.saved_tensors
        return None, _weight_grad(x, index, grad, ctx.bf16).to(ctx.weight_dtype), None


def _weight_grad(x: Tensor, index: Tensor, grad: Tensor, bf16: bool, lib: ctypes.CDLL | None = None) -> Tensor:
    """(CO, CI, 3, 3) fp32 from the forward's x (N, H, W, CI) and index, and y's gradient."""
    n, h, wd, ci = x.shape
    co = index.shape[-1]
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    parts = torch.zeros((threads, 3, 3, ci, co), dtype=torch.float64)
    (lib or _library()).conv_pool_backward_weight(x.data_ptr(), grad.data_ptr(), index.data_ptr(), parts.data_ptr(),
                                                  n, h, wd, ci, co, bf16, threads)
    return parts.sum(0).permute(3, 2, 0, 1).float().contiguous()


def conv3x3_max_pool2(x: Tensor, weight: Tensor, bn_relu: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``F.max_pool2d(F.conv2d(x, weight, padding=1), 2)`` for an ``x`` and a convolution that
    :func:`applies`, in channels_last; bf16 under CPU bf16 autocast. With ``bn_relu`` (inference only),
    ``relu(bn(...))`` of it for an eval-mode ``bn``."""
    bf16 = _bf16()
    if torch.is_grad_enabled() and weight.requires_grad:
        if bn_relu is not None:
            raise ValueError("conv3x3_max_pool2's bn_relu is for inference: run it under torch.no_grad()")
        return _ConvMaxPool2.apply(x, weight, bf16)
    return _forward(*_inputs(x, weight, bf16), bf16, keep_index=False, bn_relu=bn_relu)[0]
