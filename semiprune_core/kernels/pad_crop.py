"""The weak view's per-sample translation and mirror of uint8 CPU image batches, through ``pad_crop.c``.

``pad_crop(x, shift, flip, reflect=...)`` gives the bytes that :func:`semiprune_core.training.augment.pad_crop`
computes with torch's ops for the same random draws, in one pass instead of nine kernels around an
int64 index per pixel.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import load


def _library() -> ctypes.CDLL | None:
    lib = load("pad_crop")
    if lib is not None and lib.pad_crop_u8.argtypes is None:
        lib.pad_crop_u8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_int]
        lib.pad_crop_u8.restype = None
    return lib


def applies(x: Tensor) -> bool:
    """A contiguous 4-d uint8 CPU batch of images at least 2x2 (a reflection needs two pixels), outside
    ``torch.compile``, on a machine where the kernel was built."""
    return (x.device.type == "cpu" and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-2] >= 2 and x.shape[-1] >= 2
            and x.is_contiguous() and not torch.compiler.is_compiling() and _library() is not None)


def pad_crop(x: Tensor, shift: Tensor, flip: Tensor | None, *, reflect: bool) -> Tensor:
    """``x`` (N, C, H, W) translated by ``shift`` ((2, N) int64: rows, then columns) and, where ``flip``
    ((N,) bool) is set, mirrored left-right first; outside the image the reflection (``reflect``) or zero."""
    n, c, h, w = x.shape
    shift = shift.to(torch.int64).contiguous()
    if shift.shape != (2, n) or (flip is not None and flip.shape != (n,)):
        raise ValueError(f"pad_crop needs a (2, {n}) shift and a ({n},) flip, got {tuple(shift.shape)} and "
                         f"{None if flip is None else tuple(flip.shape)}")
    flip = None if flip is None else flip.to(torch.uint8).contiguous()
    out = torch.empty_like(x)
    _library().pad_crop_u8(x.data_ptr(), out.data_ptr(), shift.data_ptr(), None if flip is None else flip.data_ptr(),
                           n, c, h, w, int(reflect), torch.get_num_threads())
    return out
