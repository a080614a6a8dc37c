"""The augmentation views' geometric copies of uint8 CPU image batches, and RandAugment's colour ops, through ``views.c``.

``pad_crop(x, shift, flip, reflect=...)`` (the weak view's translation and mirror) and
``cutout(x, top, left, side, fill)`` give the bytes that :func:`semiprune_core.training.augment.pad_crop`
and :func:`~semiprune_core.training.augment.cutout` compute with torch's ops for the same random draws:
one pass where torch's took nine kernels around an int64 index per pixel, and only the boxes written
where torch's built a mask of the whole batch first. ``colour_ops(x, op, param, mean)`` applies one
RandAugment round's colour op to each sample of an fp32 batch in place, the same bits as
:func:`semiprune_core.training.augment._color_op` on the sample's group.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import load


def _library() -> ctypes.CDLL | None:
    lib = load("views")
    if lib is not None and lib.pad_crop_u8.argtypes is None:
        lib.pad_crop_u8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_int]
        lib.cutout_u8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_uint8] + [ctypes.c_int64] * 4
        lib.colour_ops_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        lib.pad_crop_u8.restype = lib.cutout_u8.restype = None
        lib.colour_ops_f32.restype = ctypes.c_int
    return lib


def applies(x: Tensor) -> bool:
    """A contiguous 4-d uint8 CPU batch of images at least 2x2 (pad_crop's reflection needs two pixels), outside
    ``torch.compile``, on a machine where the kernel was built."""
    return (x.device.type == "cpu" and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-2] >= 2 and x.shape[-1] >= 2
            and x.is_contiguous() and not torch.compiler.is_compiling() and _library() is not None)


def pad_crop(x: Tensor, shift: Tensor, flip: Tensor | None, *, reflect: bool) -> Tensor:
    """``x`` (N, C, H, W) translated by ``shift`` ((2, N) int64: rows, then columns) and, where ``flip``
    ((N,) bool) is set, mirrored left-right first; outside the image the reflection (``reflect``) or zero."""
    n, c, h, w = x.shape
    if reflect and (h < 2 or w < 2):  # no reflection of a single pixel: torch's ops raise there too
        raise ValueError(f"pad_crop's reflection needs images of at least 2x2 pixels, got {h}x{w}")
    shift = shift.to(torch.int64).contiguous()
    if shift.shape != (2, n) or (flip is not None and flip.shape != (n,)):
        raise ValueError(f"pad_crop needs a (2, {n}) shift and a ({n},) flip, got {tuple(shift.shape)} and "
                         f"{None if flip is None else tuple(flip.shape)}")
    flip = None if flip is None else flip.to(torch.uint8).contiguous()
    out = torch.empty_like(x)
    _library().pad_crop_u8(x.data_ptr(), out.data_ptr(), shift.data_ptr(), None if flip is None else flip.data_ptr(),
                           n, c, h, w, int(reflect), torch.get_num_threads())
    return out


def cutout(x: Tensor, top: Tensor, left: Tensor, side: Tensor, fill: int) -> Tensor:
    """A copy of ``x`` (N, C, H, W) with sample b's ``side[b]`` x ``side[b]`` box at (``top[b]``,
    ``left[b]``), clipped to the image, set to ``fill`` (0..255) in every channel."""
    n, c, h, w = x.shape
    top, left, side = (t.to(torch.int64).contiguous() for t in (top, left, side))
    if not top.shape == left.shape == side.shape == (n,):
        raise ValueError(f"cutout needs ({n},) top, left and side, got {tuple(top.shape)}, {tuple(left.shape)}, {tuple(side.shape)}")
    if not 0 <= fill <= 255 or fill != int(fill):
        raise ValueError(f"cutout's fill must be an integer 0..255 for uint8 images, got {fill!r}")
    out = x.clone()
    _library().cutout_u8(out.data_ptr(), top.data_ptr(), left.data_ptr(), side.data_ptr(), int(fill), n, c, h, w)
    return out


def colour_ops_apply(x: Tensor) -> bool:
    """A contiguous 4-d fp32 CPU batch of 1 or 3 channels, outside ``torch.compile``, with the kernel built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] in (1, 3)
            and x.is_contiguous() and not torch.compiler.is_compiling() and _library() is not None)


def colour_ops(x: Tensor, op: Tensor, param: Tensor, mean: Tensor) -> None:
    """Sample b of ``x`` (N, C, H, W), fp32 on the 0..255 scale, gets colour op ``op[b]`` (an index into
    ``augment.COLOR_OPS``, -1 for none) with ``param[b]`` (the enhance factor, posterize's step or
    solarize's threshold) and, for contrast, its grey image's mean ``mean[b]``; in place. Raises
    ``ValueError`` where equalize meets a pixel that does not round into 0..255 (torch's path fails
    there too, on its histogram's index)."""
    n, c, h, w = x.shape
    op, param, mean = op.to(torch.int32).contiguous(), param.float().contiguous(), mean.float().contiguous()
    if not op.shape == param.shape == mean.shape == (n,):
        raise ValueError(f"colour_ops needs ({n},) op, param and mean, got {tuple(op.shape)}, {tuple(param.shape)}, "
                         f"{tuple(mean.shape)}")
    status = _library().colour_ops_f32(x.data_ptr(), op.data_ptr(), param.data_ptr(), mean.data_ptr(), n, c, h, w,
                                       torch.get_num_threads())
    if status == -1:
        raise MemoryError("colour_ops could not allocate its scratch image")
    if status == -2:
        raise ValueError("RandAugment's equalize needs pixels in 0..255 (uint8 images, or floats in [0, 1]); "
                         "scale the images into that range")
