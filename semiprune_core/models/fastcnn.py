"""A small CNN shaped for speed on a CPU: narrow at full resolution, wide at low resolution.

On 28x28 input the spatial sizes are 28 -> 14 -> 7 -> 3 (32 -> 16 -> 8 -> 4 for 32x32). Cost is
dominated by the full-resolution layers, so the stem stays narrow and each 2x downsampling
(max-pool *before* the conv) buys room to double the width.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Classifier
from .registry import register_model


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FastCNN(Classifier):
    """stem conv(widths[0]) at full resolution, then per further width: max-pool 2, ``depth`` conv-BN-ReLU.

    Global max-pool + linear head. ``features(x)``: (B, widths[-1]).
    """

    def __init__(self, *, in_channels: int, num_classes: int, widths: tuple[int, ...], depth: int = 1):
        super().__init__()
        if len(widths) < 2 or depth < 1:
            raise ValueError("fastcnn needs at least two widths and depth >= 1")
        layers: list[nn.Module] = [_conv_bn(in_channels, widths[0])]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers.append(nn.MaxPool2d(2))
            layers.append(_conv_bn(c_in, c_out))
            layers.extend(_conv_bn(c_out, c_out) for _ in range(depth - 1))
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.pool(self.body(x)).flatten(1)


FASTCNN_WIDTHS = (16, 32, 64, 128)


@register_model("fastcnn")
def fastcnn(*, in_channels: int, num_classes: int, image_size: int, widths: tuple[int, ...] = FASTCNN_WIDTHS, depth: int = 1) -> FastCNN:
    """Fast CNN for 28x28 / 32x32 input (any size >= 2 ** (len(widths) - 1))."""
    if image_size < 2 ** (len(widths) - 1):
        raise ValueError(f"fastcnn with {len(widths)} widths needs image_size >= {2 ** (len(widths) - 1)}")
    return FastCNN(in_channels=in_channels, num_classes=num_classes, widths=tuple(widths), depth=depth)
