"""Backbone networks: ``mlp``, ``cnn``, ``resnet18`` and ``resnet50`` (DESIGN.md section 4).

Every backbone is an ``nn.Module`` with a ``head_name`` attribute naming its final ``nn.Linear``
(``"head"`` or, for the torchvision ResNets, ``"fc"``), so strategies can split a backbone into a
shared trunk and per-task heads without knowing its architecture (see :func:`detach_head`).
Initialization follows PyTorch / torchvision defaults: default ``nn.Linear`` init, Kaiming-normal
(fan-out, ReLU) convolutions, BatchNorm weight 1 and bias 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Names accepted by :func:`build_backbone`.
BACKBONES: tuple[str, ...] = ("mlp", "cnn", "resnet18", "resnet50")

_MLP_DEFAULT_WIDTH = 256
_MLP_DEPTH = 2
_CNN_DEFAULT_WIDTH = 32
#: Smallest spatial size (height and width) each convolutional backbone accepts.
_CNN_MIN_SIZE = 8
_RESNET_MIN_SIZE_CIFAR_STEM = 8
_RESNET_MIN_SIZE_IMAGENET_STEM = 32


class MLP(nn.Module):
    """A multilayer perceptron that flattens any input shape.

    Args:
        in_features: number of input values per sample (product of the input shape).
        num_classes: outputs of the head.
        hidden: width of each hidden layer, in order.
    """

    head_name: str = "head"

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_features
        for width in hidden:
            layers += [nn.Linear(previous, width), nn.ReLU()]
            previous = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[n, *input_shape]`` to logits ``[n, num_classes]``."""
        return self.head(self.body(x))


class ConvNet(nn.Module):
    """A small conv net: two conv-BN-ReLU-maxpool blocks, adaptive pooling to 2x2, a linear head.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the head.
        width: channels of the first block; the second block has twice as many.
    """

    head_name: str = "head"

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        c1, c2 = width, 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # [n, c1, H/2, W/2]
            nn.Conv2d(c1, c2, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # [n, c2, H/4, W/4]
            nn.AdaptiveAvgPool2d(2),  # [n, c2, 2, 2] whatever the input size
            nn.Flatten(),  # [n, 4 * c2]
        )
        self.head = nn.Linear(4 * c2, num_classes)
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[n, C, H, W]`` to logits ``[n, num_classes]``."""
        return self.head(self.features(x))


def build_backbone(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    cifar_stem: bool = True,
    width: int = 0,
) -> nn.Module:
    """Build a freshly initialized backbone.

    Initialization draws from PyTorch's global RNG, as ``nn.Module`` constructors do; wrap the
    call in a seeded ``torch.random.fork_rng`` block (see ``training.seeded_rng``) for determinism.

    Args:
        name: one of :data:`BACKBONES`.
        input_shape: shape of one sample, without the batch dimension: anything for ``mlp``,
            ``(C, H, W)`` for the others.
        num_classes: outputs of the head.
        cifar_stem: ResNets only: replace the 7x7 stride-2 first conv and the max-pool by a
            3x3 stride-1 conv (for small images such as CIFAR's 32x32).
        width: ``mlp``: hidden layer width (default 256); ``cnn``: channels of the first block
            (default 32); not supported by the ResNets. 0 means the default.

    Returns:
        The backbone; its attribute ``head_name`` names its final ``nn.Linear``.

    Raises:
        ValueError: for an unknown name, an invalid ``num_classes`` or ``width``, or an input
            shape the backbone cannot take.
    """
    shape = _check_common(name, input_shape, num_classes, width)
    if name == "mlp":
        hidden = [width or _MLP_DEFAULT_WIDTH] * _MLP_DEPTH
        return MLP(_product(shape), num_classes, hidden)
    if name == "cnn":
        channels = _check_image_shape(name, shape, _CNN_MIN_SIZE)
        return ConvNet(channels, num_classes, width or _CNN_DEFAULT_WIDTH)
    # ResNets.
    if width:
        raise ValueError(f"backbone {name!r} does not support width (got width={width}); use 0")
    min_size = _RESNET_MIN_SIZE_CIFAR_STEM if cifar_stem else _RESNET_MIN_SIZE_IMAGENET_STEM
    channels = _check_image_shape(name, shape, min_size)
    # torchvision (~4 s of imports, with torch._dynamo) only when a ResNet is configured.
    from server.engine.resnet import build_resnet

    model = build_resnet(name, num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # A replaced first conv gets the same init torchvision gives every conv of a ResNet.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def head_name_of(model: nn.Module) -> str:
    """Return the attribute name of ``model``'s final ``nn.Linear`` (its ``head_name``).

    Raises:
        ValueError: if ``model`` has no ``head_name`` or it does not name an ``nn.Linear``.
    """
    name = getattr(model, "head_name", None)
    if not isinstance(name, str) or not isinstance(getattr(model, name, None), nn.Linear):
        raise ValueError(f"{type(model).__name__} has no head_name attribute naming an nn.Linear")
    return name


def detach_head(model: nn.Module) -> nn.Linear:
    """Replace ``model``'s head by ``nn.Identity`` in place and return the removed head.

    Afterwards ``model`` maps inputs to features ``[n, head.in_features]``: it is the trunk.
    """
    name = head_name_of(model)
    head = getattr(model, name)
    setattr(model, name, nn.Identity())
    return head


def _check_common(name: str, input_shape: tuple[int, ...], num_classes: int, width: int) -> tuple[int, ...]:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of: {', '.join(BACKBONES)}")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"width must be a non-negative integer (0 = default), got {width!r}")
    return shape


def _check_image_shape(name: str, shape: tuple[int, ...], min_size: int) -> int:
    """Check that ``shape`` is ``(C, H, W)`` with H, W >= ``min_size``; return C."""
    if len(shape) != 3:
        raise ValueError(f"backbone {name!r} needs input_shape (channels, height, width), got {shape!r}")
    channels, height, width = shape
    if height < min_size or width < min_size:
        raise ValueError(
            f"backbone {name!r} needs height and width >= {min_size} for this configuration, got {height}x{width}"
        )
    return channels


def _product(shape: tuple[int, ...]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result
