"""The ResNet backbones: torchvision's ``ResNet`` with a ``head_name``.

A module of its own because importing torchvision costs seconds (it pulls in ``torch._dynamo``):
:func:`server.engine.backbones.build_backbone` imports it only when a ResNet is configured.
"""

from __future__ import annotations

from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


class ResNetBackbone(ResNet):
    """torchvision's ``ResNet`` (identical modules, parameter names and init) with ``head_name``."""

    head_name: str = "fc"


def build_resnet(name: str, num_classes: int) -> ResNetBackbone:
    """``resnet18`` or ``resnet50`` with torchvision's ImageNet stem and ``num_classes`` outputs."""
    if name == "resnet18":
        return ResNetBackbone(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    if name == "resnet50":
        return ResNetBackbone(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
    raise ValueError(f"unknown ResNet {name!r}; expected resnet18 or resnet50")
