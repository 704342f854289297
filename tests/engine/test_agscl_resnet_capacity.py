"""Capacity of ``agscl`` on the ResNets: growth of the inner block convs, pruning, Adam, checkpoints.

The ResNets run at their default widths (what users get); what is kept small is the work: digits
(1x8x8, the CIFAR stem) and 64 samples per task for one epoch, since a resnet18 step takes about a
second on the shared CPUs. Few steps are enough here: growth and pruning must change no prediction
whatever the weights are, and exact restart is a matter of state, not of accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from torch import nn

from server.engine.agscl import AgsclStrategy, build_agscl
from server.engine.agscl.capacity import grow, prune
from server.engine.agscl.growth import extend_adam
from server.engine.agscl.nodes import module_at, node_layers, zero_outgoing
from server.engine.backbones import build_backbone, detach_head
from server.engine.protocol import LearnOptions, TaskData, no_progress

from .conformance import serialized
from .test_agscl import SHAPE, agscl, split_digits

ONE_EPOCH = LearnOptions(epochs=1, batch_size=32, learning_rate=1e-3, seed=0)
TASKS = ("split01", "split23", "split45")
#: Without targeted dropout nearly every unit of the first task is important, so the second task grows.
OPTIONS: dict[str, object] = {"backbone": "resnet18", "dropout_percent": 0.0}


def small(task: str) -> TaskData:
    train = split_digits()[task][0]
    return TaskData(train.inputs[:64], train.labels[:64])


def probe(task: str) -> torch.Tensor:
    return split_digits()[task][1].inputs


def restore(state: dict[str, object]) -> AgsclStrategy:
    strategy = build_agscl(
        backbone="resnet18", input_shape=SHAPE, num_classes=10, device=torch.device("cpu"), seed=5, dropout_percent=0.0
    )
    strategy.load_state_dict(serialized(state))
    return strategy


@functools.cache
def trained(count: int) -> AgsclStrategy:
    """A resnet18 strategy after the first ``count`` tasks (shared: tests copy it, never change it)."""
    strategy = agscl(**OPTIONS) if count == 1 else copy.deepcopy(trained(count - 1))
    strategy.learn(TASKS[count - 1], small(TASKS[count - 1]), ONE_EPOCH, no_progress, {})
    strategy._predictor = None  # a snapshot holds a mapping proxy, which deepcopy refuses
    return strategy


def resizable_widths(strategy: AgsclStrategy) -> dict[str, int]:
    return {
        layer.name: width
        for layer, width in zip(strategy._layers, strategy.hidden_widths(), strict=True)
        if layer.resizable
    }


def fixed_widths(strategy: AgsclStrategy) -> dict[str, int]:
    return {
        layer.name: width
        for layer, width in zip(strategy._layers, strategy.hidden_widths(), strict=True)
        if not layer.resizable
    }


def batch_statistics_forward(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features of ``x`` in training mode (batch statistics, as during a learn that grows on the loss), on a copy."""
    return copy.deepcopy(trunk).train()(x)


def test_only_the_inner_convs_of_the_blocks_resize() -> None:
    basic = {layer.name for layer in agscl(backbone="resnet18")._layers if layer.resizable}
    assert basic == {f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)}
    trunk = build_backbone("resnet50", SHAPE, 10, cifar_stem=True)
    bottleneck = {layer.name for layer in node_layers(trunk, "resnet50") if layer.resizable}
    assert "layer1.0.conv2" in bottleneck and "layer1.0.conv1" in bottleneck
    assert not bottleneck & {"conv1", "layer1.0.conv3", "layer1.0.downsample.0"}
    assert len(bottleneck) == 2 * (3 + 4 + 6 + 3)


def test_capacity_on_is_accepted_for_resnets_and_auto_grows_them() -> None:
    for backbone in ("resnet18", "resnet50"):
        assert agscl(backbone=backbone, capacity="on").config.resizable
        assert agscl(backbone=backbone).config.resizable  # auto
        assert not agscl(backbone=backbone, capacity="off").config.resizable


def test_the_second_task_grows_the_inner_convs_and_nothing_else() -> None:
    first, second = trained(1), trained(2)
    assert second.describe()["grown_units"] > 0
    assert fixed_widths(second) == fixed_widths(first)  # the residual stream keeps its width
    for name, width in resizable_widths(first).items():
        assert resizable_widths(second)[name] == width + -(-width // 4), name  # k = 25 %, rounded up
    assert second.parameter_count() > first.parameter_count()
    # Every task's BatchNorm statistics follow the new widths; the first task's, of units it never ran, are fresh.
    for stats in second._stats.values():
        for name, buffer in second._trunk.named_buffers():
            assert stats[name].shape == buffer.shape, name
    old_task = second._stats["split01"]
    assert torch.equal(old_task["layer1.0.bn1.running_mean"][64:], torch.zeros(16))
    assert torch.equal(old_task["layer1.0.bn1.running_var"][64:], torch.ones(16))


def test_growth_changes_no_prediction_of_any_task() -> None:
    strategy = copy.deepcopy(trained(2))
    before = {task: strategy.predictor().predict(task, probe(task)) for task in TASKS[:2]}
    trunk = copy.deepcopy(strategy._trunk)
    x = probe("split01")[:32]
    train_before = batch_statistics_forward(trunk, x)
    heads = dict(strategy._heads)
    shares = {t: dict(per) for t, per in strategy._shares.items()}
    stats = dict(strategy._stats)
    extra = strategy._extra(trunk)
    omega = strategy._omega(shares, strategy._widths(trunk))
    template = strategy._grow(trunk, heads, {}, strategy._template, shares, stats, extra, omega, seed=11)
    assert torch.allclose(batch_statistics_forward(trunk, x), train_before, atol=1e-5)

    strategy._trunk, strategy._heads, strategy._template = trunk, heads, template
    strategy._shares, strategy._stats, strategy._predictor = shares, stats, None
    assert sum(resizable_widths(strategy).values()) > sum(resizable_widths(trained(2)).values())
    for task, logits in before.items():
        assert torch.allclose(strategy.predictor().predict(task, probe(task)), logits, atol=1e-5), task


def test_resnet50_bottleneck_growth_changes_nothing_and_adam_extends() -> None:
    """Both inner convs of a bottleneck grow; the middle one reads the first (fresh weights into its free units)."""
    torch.manual_seed(0)
    trunk = build_backbone("resnet50", (3, 8, 8), 10, cifar_stem=True)
    head = detach_head(trunk)
    layers = node_layers(trunk, "resnet50")
    optimizer = torch.optim.Adam(trunk.parameters(), lr=1e-3)
    x = torch.rand(8, 3, 8, 8)
    trunk(x).square().mean().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(0)
    omega = {
        layer.name: (torch.rand(module_at(trunk, layer.name).weight.shape[0], generator=generator) < 0.7).float()
        for layer in layers
    }
    # What AGS-CL keeps true: a free unit's outgoing weights are zero.
    zero_outgoing(trunk, layers, {name: value == 0 for name, value in omega.items()}, [head])
    trunk.eval()
    before = head(trunk(x))
    train_before = batch_statistics_forward(trunk, x)
    old = list(trunk.parameters())
    old_values = [p.detach().clone() for p in old]
    extra = {layer.name: 4 for layer in layers if layer.resizable}
    grown = grow(trunk, layers, extra, [head], head, omega, torch.Generator().manual_seed(1))
    assert torch.allclose(batch_statistics_forward(trunk, x), train_before, atol=1e-5)
    assert torch.allclose(grown[0](trunk(x)), before, atol=1e-5)
    conv2 = module_at(trunk, "layer1.0.conv2").weight
    assert conv2.shape[:2] == (64 + 4, 64 + 4)
    free_rows = (omega["layer1.0.conv2"] == 0).nonzero().flatten()
    assert bool(conv2[free_rows][:, 64:].abs().sum() > 0)  # new units feed free nodes, which feed nothing yet
    assert torch.equal(module_at(trunk, "layer1.0.conv3").weight[:, 64:], torch.zeros(256, 4, 1, 1))
    adam = extend_adam(optimizer, old, list(trunk.parameters()))
    for before_value, after in zip(old_values, trunk.parameters(), strict=True):
        corner = tuple(slice(0, size) for size in before_value.shape)
        assert torch.equal(after[corner], before_value)
        assert adam.state[after]["exp_avg"].shape == after.shape

    with pytest.raises(ValueError, match="residual stream"):
        grow(trunk, layers, {"layer1.0.conv3": 1}, [], head, omega, torch.Generator())
    with pytest.raises(ValueError, match="residual stream"):
        prune(trunk, layers, {"conv1": torch.arange(10)}, [])


def test_checkpoint_after_growth_predicts_identically_and_continues_identically() -> None:
    original = copy.deepcopy(trained(2))
    restored = restore(original.state_dict())
    assert restored.hidden_widths() == original.hidden_widths()
    assert restored.parameter_count() == original.parameter_count()
    for task in TASKS[:2]:
        assert torch.equal(
            restored.predictor().predict(task, probe(task)), original.predictor().predict(task, probe(task))
        )
    restored.learn("split45", small("split45"), ONE_EPOCH, no_progress, {})
    continued = trained(3)  # the in-memory original, continued
    assert continued.describe()["grown_units"] > trained(2).describe()["grown_units"]  # grew again
    assert restored.hidden_widths() == continued.hidden_widths()
    for task in TASKS:
        assert torch.equal(
            restored.predictor().predict(task, probe(task)), continued.predictor().predict(task, probe(task))
        )


def test_pruning_after_an_unlearn_changes_no_retained_prediction() -> None:
    """Release then prune against release alone, from the same state: the pruned units change nothing."""
    state = trained(3).state_dict()
    pruned, kept = restore(state), restore(state)
    kept.config = dataclasses.replace(kept.config, prune=False)
    units = 0.0
    for task in ("split45", "split23"):
        units += pruned.unlearn(task, "release", no_progress, {}).metrics["pruned_units"]
        kept.unlearn(task, "release", no_progress, {})
        logits = kept.predictor().predict("split01", probe("split01"))
        assert torch.allclose(pruned.predictor().predict("split01", probe("split01")), logits, atol=1e-5)
    assert units > 0 and pruned.parameter_count() < kept.parameter_count()
    assert fixed_widths(pruned) == fixed_widths(kept)
    for name, width in resizable_widths(pruned).items():
        assert pruned._initial_widths[name] <= width <= resizable_widths(kept)[name]
    # Ω shares and the remaining task's statistics follow the pruned widths; a restart holds the shapes.
    widths = dict(zip((layer.name for layer in pruned._layers), pruned.hidden_widths(), strict=True))
    assert all(share.numel() == widths[name] for name, share in pruned._shares["split01"].items())
    again = restore(pruned.state_dict())
    assert torch.equal(again.predictor().predict("split01", probe("split01")), logits)


def test_growth_on_the_loss_extends_adam_and_trains_the_new_channels() -> None:
    """τ below any loss, patience 1: the blocks grow after the first epoch and the second trains the new units."""
    # Without targeted dropout, which would pick the new units (the weakest incoming norms) and leave them free.
    strategy = agscl(backbone="resnet18", grow_loss=1e-6, grow_patience=1, dropout_percent=0.0)
    data = small("split01")
    report = strategy.learn(
        "split01",
        TaskData(data.inputs[:32], data.labels[:32]),
        dataclasses.replace(ONE_EPOCH, epochs=2),
        no_progress,
        {},
    )
    assert report.metrics["loss_growths"] == 1 and report.metrics["grown_units"] > 0
    conv2 = module_at(strategy._trunk, "layer1.0.conv2").weight
    assert conv2.shape[1] == 80
    assert bool(conv2[:, 64:].abs().sum() > 0)  # the new channels' outgoing weights were trained after the growth
    assert all(isinstance(head, nn.Linear) for head in strategy._heads.values())
