"""A small CNN shaped for speed on a CPU: narrow at full resolution, wide at low resolution.

On 28x28 input the spatial sizes are 28 -> 14 -> 7 -> 3 (32 -> 16 -> 8 -> 4 for 32x32). Cost is
dominated by the full-resolution layers, so the first conv stays narrow and each 2x downsampling
buys room to double the width. Each stage is conv -> max-pool -> BatchNorm -> ReLU (airbench's
order): BatchNorm and ReLU then run on the pooled, 4x smaller tensor, which measured about 1.6x
faster per training step on a 2-core CPU than pooling before the conv, for the same conv cost.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Classifier
from .registry import register_model


class MaxPool2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` whose inference runs without the argmax indices.

    Without autograd the 2x2 maximum is taken as two element-wise maxima over strided views: the
    same values bit for bit, but no int64 index tensor to write. On 2 CPU cores in bf16 channels_last
    that made the first pool of ``fastcnn`` 2.3x faster and its whole inference 1.2x (held-out
    scoring, pseudo-labels, test accuracy). Training keeps torch's kernel, whose backward needs the
    indices (a hand-written backward over the views measured 3-5x slower).
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return F.max_pool2d(x, 2)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode: an odd last row/column is dropped
        rows = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _stage(c_in: int, c_out: int, *, pool: bool, depth: int) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(MaxPool2())
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return layers


class FastCNN(Classifier):
    """One stage per width: conv3x3 -> max-pool 2 (all but the last stage) -> BN -> ReLU, plus
    ``depth - 1`` extra conv-BN-ReLU at the pooled resolution. Global max-pool + linear head.
    ``features(x)``: (B, widths[-1]).

    ``stem="s2d"`` replaces the first stage's full-resolution conv + pool by a space-to-depth
    rearrangement (each 2x2 pixel block becomes 4 channels) and a conv (with bias, no BatchNorm,
    like airbench's whitening stem) at half resolution: the same spatial sizes afterwards, no
    full-resolution activation at all.
    """

    def __init__(self, *, in_channels: int, num_classes: int, widths: tuple[int, ...], depth: int = 1, stem: str = "conv"):
        super().__init__()
        if len(widths) < 2 or depth < 1:
            raise ValueError("fastcnn needs at least two widths and depth >= 1")
        if stem not in ("conv", "s2d"):
            raise ValueError(f"fastcnn stem must be 'conv' or 's2d', got {stem!r}")
        if stem == "s2d":
            # no BatchNorm right after the stem conv: with 8 channels in channels_last it cost ~20% of a step
            layers: list[nn.Module] = [nn.PixelUnshuffle(2), nn.Conv2d(4 * in_channels, widths[0], 3, padding=1), nn.ReLU(inplace=True)]
            for _ in range(depth - 1):
                layers += [nn.Conv2d(widths[0], widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        else:
            layers = _stage(in_channels, widths[0], pool=True, depth=depth)
        for i, (c_in, c_out) in enumerate(itertools.pairwise(widths), start=1):
            layers += _stage(c_in, c_out, pool=i < len(widths) - 1, depth=depth)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.body(x)).flatten(1)


def _fastcnn(default_widths: tuple[int, ...], default_stem: str = "conv"):
    def factory(
        *, in_channels: int, num_classes: int, image_size: int,
        widths: tuple[int, ...] = default_widths, depth: int = 1, stem: str = default_stem,
    ) -> FastCNN:
        if image_size < 2 ** (len(widths) - 1) or (stem == "s2d" and image_size % 2):
            raise ValueError(f"fastcnn with {len(widths)} widths needs an image_size >= {2 ** (len(widths) - 1)} (even for stem 's2d')")
        return FastCNN(in_channels=in_channels, num_classes=num_classes, widths=tuple(widths), depth=depth, stem=stem)

    factory.__doc__ = f"FastCNN with widths {default_widths}, stem {default_stem!r} (override with ``widths=``, ``depth=``, ``stem=``)."
    return factory


# Measured on Fashion-MNIST, 2-core CPU, fp32, channels_last (benchmarks/bench_engine.py):
#   fastcnn_s  batch 512: ~37k img/s, 92.2% test accuracy after 24 epochs (~41 s)
#   fastcnn    batch 256: ~14k img/s, 92.6% after 10 epochs (~42 s)
#   fastcnn_l  batch 256:  ~5k img/s, 93.2% after 10 epochs
fastcnn_s = register_model("fastcnn_s")(_fastcnn((8, 16, 32, 64), "s2d"))
fastcnn = register_model("fastcnn")(_fastcnn((16, 32, 64, 128)))
fastcnn_l = register_model("fastcnn_l")(_fastcnn((32, 64, 128, 256)))
