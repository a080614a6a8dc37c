"""A training-mode BatchNorm and the ReLU after it, on channels-last CPU tensors, through ``bn_relu.c``.

``batch_norm_relu(x, bn)`` is ``F.relu(bn(x))`` for a ``bn`` in training mode, forward and backward,
with the same side effects: the running statistics and ``num_batches_tracked`` are updated as torch
updates them. torch's kernels for the two took 20-50x as long as a copy of the tensor on a bf16
``fastcnn`` step (about a quarter of the step); this makes two passes over memory forward and two
backward.

The values are torch's up to rounding, not its bits: the batch statistics are summed in another
order (fp32 within blocks of rows, double across them, shifted by each channel's first value so a
large mean costs no precision), so an output can differ from torch's by a rounding step of its type.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from . import load

_DTYPES = (torch.bfloat16, torch.float32)

#: The kernel keeps three fp32 vectors of the channels on each thread's stack.
MAX_CHANNELS = 4096


def _library() -> ctypes.CDLL | None:
    lib = load("bn_relu")
    if lib is not None and lib.bn_relu_forward.argtypes is None:
        shape = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
        lib.bn_relu_forward.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_double, ctypes.c_double] + shape
        lib.bn_relu_backward.argtypes = [ctypes.c_void_p] * 7 + shape
        lib.bn_relu_forward.restype = lib.bn_relu_backward.restype = ctypes.c_int
    return lib


def _fp32_cpu(t: Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def applies(x: Tensor, bn: nn.Module) -> bool:
    """``bn`` is a ``BatchNorm2d`` in training mode with fp32 CPU parameters and buffers, and ``x`` a
    4-d bf16/fp32 CPU tensor in channels_last with more than one value per channel, outside
    ``torch.compile``, on a machine where the kernel was built."""
    return (isinstance(bn, nn.BatchNorm2d) and bn.training and x.device.type == "cpu" and x.dtype in _DTYPES
            and x.dim() == 4 and x.shape[1] == bn.num_features <= MAX_CHANNELS and x.numel() > x.shape[1]
            and x.is_contiguous(memory_format=torch.channels_last)
            and all(_fp32_cpu(t) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
            and not torch.compiler.is_compiling() and _library() is not None)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _out_of_memory(what: str) -> MemoryError:
    return MemoryError(f"bn_relu {what}: no memory for the per-thread sums; free memory or set SEMIPRUNE_NATIVE=0")


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, momentum: float, eps: float) -> Tensor:
        c = x.shape[1]
        y = torch.empty_like(x, memory_format=torch.channels_last)
        terms = torch.empty((4, c), dtype=torch.float32)
        if _library().bn_relu_forward(x.data_ptr(), y.data_ptr(), _ptr(weight), _ptr(bias), terms.data_ptr(),
                                      _ptr(running_mean), _ptr(running_var), momentum, eps,
                                      x.numel() // c, c, x.dtype == torch.bfloat16, torch.get_num_threads()):
            raise _out_of_memory("forward")
        ctx.save_for_backward(x, terms, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, terms, weight = ctx.saved_tensors
        c = x.shape[1]
        grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        grad_w, grad_b = torch.empty(c), torch.empty(c)
        if _library().bn_relu_backward(grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(), terms.data_ptr(), _ptr(weight),
                                       grad_w.data_ptr(), grad_b.data_ptr(), x.numel() // c, c,
                                       x.dtype == torch.bfloat16, torch.get_num_threads()):
            raise _out_of_memory("backward")
        needs = ctx.needs_input_grad
        return (grad_x if needs[0] else None, grad_w if needs[1] else None, grad_b if needs[2] else None,
                None, None, None, None)


def batch_norm_relu(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """``F.relu(bn(x))`` for an ``x`` and a training-mode ``bn`` that :func:`applies`, with ``bn``'s
    running statistics and ``num_batches_tracked`` updated as its own forward updates them."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    tracked = bn.track_running_stats and bn.running_mean is not None
    if tracked and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative average
            momentum = 1.0 / float(bn.num_batches_tracked)
    return _BatchNormReLU.apply(x, bn.weight, bn.bias, bn.running_mean if tracked else None,
                                bn.running_var if tracked else None, momentum, bn.eps)
