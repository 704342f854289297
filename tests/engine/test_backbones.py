"""Backbones: output shapes, head naming, stems, initialization and input checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from server.engine.backbones import BACKBONES, build_backbone, detach_head, head_name_of
from server.engine.training import seeded_rng

CASES = [
    ("mlp", (1, 8, 8), {}),
    ("mlp", (64,), {}),
    ("mlp", (3, 5), {"width": 32}),
    ("cnn", (1, 8, 8), {}),
    ("cnn", (3, 32, 32), {"width": 8}),
    ("resnet18", (3, 32, 32), {"cifar_stem": True}),
    ("resnet18", (1, 8, 8), {"cifar_stem": True}),
    ("resnet18", (3, 32, 32), {"cifar_stem": False}),
    ("resnet50", (3, 32, 32), {"cifar_stem": True}),
]


@pytest.mark.parametrize(("name", "shape", "options"), CASES)
def test_output_shape_and_head(name: str, shape: tuple[int, ...], options: dict[str, object]) -> None:
    model = build_backbone(name, shape, 7, **options).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape == (2, 7)
    head = getattr(model, head_name_of(model))
    assert isinstance(head, nn.Linear) and head.out_features == 7


def test_backbone_names() -> None:
    assert BACKBONES == ("mlp", "cnn", "resnet18", "resnet50")


def test_mlp_width_sets_the_hidden_layers() -> None:
    model = build_backbone("mlp", (1, 8, 8), 10)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [256, 256, 10]
    model = build_backbone("mlp", (1, 8, 8), 10, width=32)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [32, 32, 10]


def test_resnet_stems() -> None:
    cifar = build_backbone("resnet18", (3, 32, 32), 10, cifar_stem=True)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    imagenet = build_backbone("resnet18", (3, 224, 224), 10, cifar_stem=False)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    grey = build_backbone("resnet18", (1, 28, 28), 10)
    assert grey.conv1.in_channels == 1
    assert head_name_of(cifar) == "fc"


def test_convolutions_are_kaiming_normal_fan_out() -> None:
    # torchvision's ResNet init, also for the replaced first conv: std = sqrt(2 / fan_out).
    conv = build_backbone("resnet18", (3, 32, 32), 10).conv1.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    cnn_conv = next(m for m in build_backbone("cnn", (1, 8, 8), 10).modules() if isinstance(m, nn.Conv2d))
    fan_out = cnn_conv.weight.shape[0] * 9
    assert cnn_conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.25)


def test_detach_head_leaves_the_trunk() -> None:
    model = build_backbone("cnn", (1, 8, 8), 10, width=8)
    head = detach_head(model)
    assert isinstance(head, nn.Linear) and head.out_features == 10
    assert model.eval()(torch.rand(3, 1, 8, 8)).shape == (3, head.in_features)


def test_seeded_construction_is_deterministic_and_restores_the_global_rng() -> None:
    before = torch.random.get_rng_state()
    with seeded_rng(5):
        first = build_backbone("mlp", (64,), 10)
    with seeded_rng(5):
        second = build_backbone("mlp", (64,), 10)
    assert torch.equal(torch.random.get_rng_state(), before)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "shape", "options", "message"),
    [
        ("vgg", (3, 32, 32), {}, "unknown backbone 'vgg'"),
        ("cnn", (64,), {}, "channels, height, width"),
        ("cnn", (1, 4, 4), {}, ">= 8"),
        ("resnet18", (3, 4, 4), {"cifar_stem": True}, ">= 8"),
        ("resnet18", (3, 16, 16), {"cifar_stem": False}, ">= 32"),
        ("resnet50", (3, 32), {}, "channels, height, width"),
        ("resnet18", (3, 32, 32), {"width": 16}, "width"),
        ("mlp", (), {}, "input_shape"),
        ("mlp", (0, 8), {}, "input_shape"),
        ("mlp", (-1,), {}, "input_shape"),
        ("mlp", (8,), {"num_classes": 0}, "num_classes"),
        ("mlp", (8,), {"width": -1}, "width"),
    ],
)
def test_rejects_what_it_cannot_build(
    name: str, shape: tuple[int, ...], options: dict[str, object], message: str
) -> None:
    num_classes = options.pop("num_classes", 10)
    with pytest.raises(ValueError, match=message):
        build_backbone(name, shape, num_classes, **options)  # type: ignore[arg-type]
