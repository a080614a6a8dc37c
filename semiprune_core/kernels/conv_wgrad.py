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
    lib.conv3x3_wgrad.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    lib.conv3x3_wgrad.restype = lib.conv3x3_wgrad_ready.restype = ctypes.c_int
    return lib if lib.conv3x3_wgrad_ready() else None  # built without AMX, or the OS does not grant it


def applies(x: Tensor, weight: Tensor) -> bool:
    """A 4-d CPU ``x`` into a 3x3 ``weight`` with input channels a multiple of 16 and output channels a
    multiple of 32, outside ``torch.compile``, on a machine whose CPU and kernel have AMX."""
    return (x.device.type == "cpu" and x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3)
            and x.shape[1] == weight.shape[1] and x.shape[1] % 16 == 0 and weight.shape[0] % 32 == 0
            and not torch.compiler.is_compiling() and _library() is not None)


def conv3x3_weight_grad(x: Tensor, grad: Tensor) -> Tensor:
    """The fp32 gradient (O, C, 3, 3) of a stride-1, padding-1 3x3 convolution's weight, from its bf16
    input ``x`` (N, C, H, W) and its output's gradient ``grad`` (N, O, H, W)."""
    n, c, h, w = x.shape
    o = grad.shape[1]
    if grad.shape != (n, o, h, w) or c % 16 or o % 32:
        raise ValueError(f"conv3x3_weight_grad needs x (N, C, H, W) and grad (N, O, H, W) with C a multiple of 16 "
                         f"and O of 32, got {tuple(x.shape)} and {tuple(grad.shape)}")
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    grad = grad.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    parts = torch.empty((torch.get_num_threads(), 3, 3, c, o), dtype=torch.float32)
    used = _library().conv3x3_wgrad(x.data_ptr(), grad.data_ptr(), parts.data_ptr(), n, h, w, c, o,
                                    torch.get_num_threads())
    if used < 0:
        raise MemoryError("conv3x3_weight_grad could not allocate its buffers")
    return parts[:used].sum(0).permute(3, 2, 0, 1).contiguous()
