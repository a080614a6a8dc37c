"""Importing torchvision on a CPU-only torch.

torchvision 0.28.0 (the release that pins torch 2.13.0) ships as a CUDA build. On a CPU torch its
C++ extension does not load, and ``import torchvision`` then fails with "operator torchvision::nms
does not exist" because the Python side registers fake kernels for ops whose schema was never
defined. Defining the two schemas first makes datasets, transforms, models and ``torch.compile``
work; ``torchvision.ops.nms`` and ``torchvision.io.decode_*`` stay unavailable (we read images with
PIL). Import torchvision only through :func:`import_torchvision`.
"""

from __future__ import annotations

import importlib
import types

_fixed = False
_keep_alive: list = []  # a torch.library.Library unregisters its schemas when collected


def import_torchvision() -> types.ModuleType:
    global _fixed
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::nms" not in str(err) or _fixed:
            raise
    import sys

    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _keep_alive.append(lib)
    _fixed = True
    return importlib.import_module("torchvision")
