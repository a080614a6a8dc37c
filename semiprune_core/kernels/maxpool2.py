"""2x2 max-pooling (stride 2) of channels-last CPU tensors through ``maxpool2.c``: torch's bits, faster.

``max_pool2(x)`` equals ``F.max_pool2d(x, 2)`` bit for bit, forward and backward, including ties
(the first maximum in row-major order takes the gradient) and NaNs, for every ``x`` that
:func:`applies`. It keeps a one-byte index of each window's maximum instead of torch's int64, and
its backward writes the input gradient in one pass instead of a zero-fill and a scatter; without
autograd it keeps no index at all. In inference, ``max_pool2(x, bn_relu=(scale, shift))`` also applies
an eval-mode BatchNorm and a ReLU to the pooled values as it writes them (:func:`bn_relu_terms`).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import load

_DTYPES = (torch.bfloat16, torch.float32)


def _library() -> ctypes.CDLL | None:
    lib = load("maxpool2")
    if lib is not None and lib.maxpool2_forward.argtypes is None:
        sizes = [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_int]
        lib.maxpool2_forward.argtypes = [ctypes.c_void_p] * 5 + sizes
        lib.maxpool2_backward.argtypes = [ctypes.c_void_p] * 3 + sizes
        lib.bn_relu_global_max.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_int]
        lib.maxpool2_forward.restype = lib.maxpool2_backward.restype = lib.bn_relu_global_max.restype = None
    return lib


def applies(x: Tensor) -> bool:
    """A 4-d bf16/fp32 CPU tensor in channels_last, at least 2x2, outside ``torch.compile``, on a
    machine where the kernel was built."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 4 and x.shape[-2] >= 2 and x.shape[-1] >= 2
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling()
            and _library() is not None)


def bn_relu_terms(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The per-channel ``(scale, shift)``, fp32, with which an eval-mode ``bn`` (running statistics)
    followed by a ReLU is ``max(0, fma(v, scale, shift))``, as torch's CPU kernel computes it: scale =
    weight / sqrt(var + eps) as torch's own kernel rounds it (read back from a BatchNorm of ones with a
    zero mean and bias: it matched 1 / sqrt on a Xeon with AVX-512 and weight * rsqrt on an AVX2 EPYC,
    which differ in 15 % of values), shift = bias - mean * scale rounded once (the product is exact in float64). With these
    terms the fused kernels give torch's bits in bf16; in fp32 torch's own kernel rounds some outputs
    differently depending on the shape, and they agree to one rounding step."""
    c = bn.running_var.numel()
    weight = None if bn.weight is None else bn.weight.detach().float()
    with torch.no_grad():
        scale = F.batch_norm(torch.ones(1, c, 1, 1), torch.zeros(c), bn.running_var.detach().float(), weight, None,
                             False, 0.0, bn.eps).view(c)
    shift = -bn.running_mean.detach().double() * scale.double()
    if bn.bias is not None:
        shift = bn.bias.detach().double() + shift
    return scale.contiguous(), shift.float().contiguous()


def _pool(x: Tensor, keep_index: bool, bn_relu: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    n, c, h, w = x.shape
    y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
    index = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8) if keep_index else None
    scale, shift = (None, None) if bn_relu is None else (t.data_ptr() for t in checked_terms(bn_relu, c))
    _library().maxpool2_forward(x.data_ptr(), y.data_ptr(), None if index is None else index.data_ptr(), scale, shift,
                                n, h, w, c, x.dtype == torch.bfloat16, torch.get_num_threads())
    return y, index


def checked_terms(bn_relu: tuple[Tensor, Tensor], channels: int) -> tuple[Tensor, Tensor]:
    """Checks ``(scale, shift)`` before their pointers reach C: fp32 CPU vectors of ``channels``."""
    for t in bn_relu:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.shape != (channels,) or not t.is_contiguous():
            raise ValueError(f"bn_relu terms must be contiguous fp32 CPU vectors of {channels} channels; use bn_relu_terms(bn)")
    return bn_relu


class _MaxPool2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y, index = _pool(x, keep_index=True)
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (index,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty((n, c, h, w), dtype=grad.dtype, memory_format=torch.channels_last)
        _library().maxpool2_backward(grad.data_ptr(), index.data_ptr(), grad_x.data_ptr(),
                                     n, h, w, c, grad.dtype == torch.bfloat16, torch.get_num_threads())
        return grad_x


def max_pool2(x: Tensor, bn_relu: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``F.max_pool2d(x, 2)`` of an ``x`` that :func:`applies`; with ``bn_relu`` (inference only: no
    gradient flows through it), ``relu(bn(F.max_pool2d(x, 2)))`` of an eval-mode ``bn``."""
    if torch.is_grad_enabled() and x.requires_grad:
        if bn_relu is not None:
            raise ValueError("max_pool2's bn_relu is for inference: run it under torch.no_grad()")
        return _MaxPool2.apply(x)
    return _pool(x, keep_index=False, bn_relu=bn_relu)[0]


def bn_relu_global_max(x: Tensor, bn_relu: tuple[Tensor, Tensor]) -> Tensor:
    """``relu(bn(x)).amax((2, 3))`` of an ``x`` that :func:`applies` and an eval-mode ``bn`` given by its
    :func:`bn_relu_terms`, (N, C): inference's last BatchNorm, ReLU and global max-pool in one read of
    ``x``. The BatchNorm and ReLU are monotone per channel, so each channel's largest (or, where its
    scale is negative, smallest) value gives the maximum: the same bits as the three layers."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("bn_relu_global_max is for inference: run it under torch.no_grad()")
    if not applies(x):
        raise ValueError("bn_relu_global_max needs a 4-d bf16/fp32 CPU tensor in channels_last (see applies)")
    n, c, h, w = x.shape
    scale, shift = checked_terms(bn_relu, c)
    out = torch.empty((n, c), dtype=x.dtype)
    _library().bn_relu_global_max(x.data_ptr(), out.data_ptr(), scale.data_ptr(), shift.data_ptr(), n, h * w, c,
                                  x.dtype == torch.bfloat16, torch.get_num_threads())
    return out
