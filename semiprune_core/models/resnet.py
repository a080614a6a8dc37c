"""ResNet-18 for small images (CIFAR style): 3x3 stride-1 stem, no max-pool."""

from __future__ import annotations

from torch import Tensor, nn

from ..compat import import_torchvision
from .base import Classifier
from .registry import register_model


class ResNetCifar(Classifier):
    """torchvision's ResNet-18 with the stem replaced. ``features(x)``: (B, 512) after global average pooling."""

    def __init__(self, *, in_channels: int, num_classes: int):
        super().__init__()
        tv = import_torchvision()
        net = tv.models.resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.head = net.fc
        net.fc = nn.Identity()
        self.backbone = net

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)


@register_model("resnet18_cifar")
def resnet18_cifar(*, in_channels: int, num_classes: int, image_size: int) -> ResNetCifar:
    return ResNetCifar(in_channels=in_channels, num_classes=num_classes)
