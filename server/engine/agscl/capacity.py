"""Capacity: growing and pruning the node layers of an ``mlp`` or ``cnn`` trunk (seed on dynamic model size).

Growth (seed section 4.2.2): every node layer gets k % more units (``Linear`` outputs or conv
channels, with their BatchNorm); the old weights are copied, the new ones are initialized as at
construction (from a seeded generator), except the weights from a new unit into an *important* node
of the next layer, which are zero: a new unit is free (Ω = 0), and AGS-CL never lets a free node
feed an important one (I.1). The heads of existing tasks read nothing from new units (zero columns),
and new BatchNorm channels start with the statistics of a fresh layer, so growth changes no
prediction.

Pruning (seed section 4.2.1, "unit pruning"): after an unlearn frees units, free units are removed
down to a reserve. A free unit's outgoing weights into important nodes and into the heads are zero
(I.1), so removing it changes no prediction either.

Both assume the layout of ``mlp`` and ``cnn``: a chain of node layers, each consumed by the next
and the last by the heads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from server.engine.agscl.nodes import NodeLayer, column_index, fresh_rows, module_at


def _replace(trunk: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = trunk.get_submodule(parent_path) if parent_path else trunk
    setattr(parent, child, module)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight)
    if bias is not None:
        module.bias = nn.Parameter(bias)
    return module


def _like(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A producer of ``old``'s kind and hyperparameters holding ``weight`` and ``bias``."""
    if isinstance(old, nn.Linear):
        return _linear(weight, bias)
    assert isinstance(old, nn.Conv2d)
    module = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        kernel_size=old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        bias=bias is not None,
        device="meta",
    )
    module.weight = nn.Parameter(weight)
    if bias is not None:
        module.bias = nn.Parameter(bias)
    return module


def _norm(old: nn.BatchNorm2d, keep: torch.Tensor | None, extra: int) -> nn.BatchNorm2d:
    """``old`` with only the channels ``keep`` (None: all) and ``extra`` fresh ones appended."""
    index = torch.arange(old.num_features, device=old.weight.device) if keep is None else keep.to(old.weight.device)
    width = index.numel() + extra
    module = nn.BatchNorm2d(width, eps=old.eps, momentum=old.momentum, device=old.weight.device)
    with torch.no_grad():
        module.weight[: index.numel()] = old.weight[index]
        module.bias[: index.numel()] = old.bias[index]
        assert old.running_mean is not None and old.running_var is not None
        module.running_mean[: index.numel()] = old.running_mean[index]  # type: ignore[index]
        module.running_var[: index.numel()] = old.running_var[index]  # type: ignore[index]
    module.num_batches_tracked = old.num_batches_tracked
    return module


def resize_statistics(
    stats: Mapping[str, torch.Tensor],
    layers: tuple[NodeLayer, ...],
    keep: Mapping[str, torch.Tensor | None],
    extra: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """A task's BatchNorm statistics resized like the trunk: channels ``keep`` (None: all), then fresh ones."""
    resized = dict(stats)
    for layer in layers:
        if layer.norm is None:
            continue
        kept, added = keep.get(layer.name), extra.get(layer.name, 0)
        for buffer, fill in (("running_mean", 0.0), ("running_var", 1.0)):
            name = f"{layer.norm}.{buffer}"
            value = stats[name] if kept is None else stats[name][kept.to(stats[name].device)]
            resized[name] = torch.cat([value, value.new_full((added,), fill)])
    return resized


@torch.no_grad()
def grow(
    trunk: nn.Module,
    layers: tuple[NodeLayer, ...],
    extra: Mapping[str, int],
    heads: list[nn.Linear],
    template: nn.Linear,
    omega: Mapping[str, torch.Tensor],
    generator: torch.Generator,
) -> list[nn.Linear]:
    """Add ``extra[layer]`` units to each node layer (in place); return the grown heads, then the template.

    Args:
        trunk: the trunk; its producers (and BatchNorms) are replaced by larger ones.
        layers: its node layers, a chain (each consumed by the next, the last by the heads).
        extra: layer name → units to add.
        heads: the task heads; returned with zero columns for the new units (not modified).
        template: the head new tasks start from; returned last, grown with freshly initialized columns.
        omega: layer name → Ω ``[old nodes]``; new units' weights into important nodes are zero.
        generator: draws the new weights.
    """
    for i, layer in enumerate(layers):
        old = module_at(trunk, layer.name)
        assert isinstance(old, nn.Linear | nn.Conv2d)
        previous = layers[i - 1].name if i > 0 else None
        out_old, in_old = old.weight.shape[:2]
        out_new = out_old + extra.get(layer.name, 0)
        in_new = in_old + (extra.get(previous, 0) if previous else 0)
        shaped = _like(
            old,
            torch.empty(out_new, in_new, *old.weight.shape[2:], device="meta"),
            None if old.bias is None else torch.empty(out_new, device="meta"),
        )
        fresh = fresh_rows(shaped, generator)
        weight = fresh[0].to(old.weight.device)
        weight[:out_old, :in_old] = old.weight
        bias = None
        if old.bias is not None:
            bias = fresh[1].to(old.weight.device)
            bias[:out_old] = old.bias
        if previous is not None and in_new > in_old:
            important = omega[layer.name].to(weight.device) > 0  # [out_old]
            weight[:out_old, in_old:][important] = 0.0
        _replace(trunk, layer.name, _like(old, weight, bias))
        if layer.norm is not None:
            norm = module_at(trunk, layer.norm)
            assert isinstance(norm, nn.BatchNorm2d)
            _replace(trunk, layer.norm, _norm(norm, None, extra.get(layer.name, 0)))
    last = layers[-1]
    block = max(last.head_block, 1)
    added = extra.get(last.name, 0) * block
    grown: list[nn.Linear] = []
    for head in heads:
        weight = torch.cat([head.weight, head.weight.new_zeros(head.out_features, added)], dim=1)
        grown.append(_linear(weight, head.bias.clone()))
    fresh = fresh_rows(nn.Linear(template.in_features + added, template.out_features, device="meta"), generator)
    weight = fresh[0].to(template.weight.device)
    weight[:, : template.in_features] = template.weight
    grown.append(_linear(weight, template.bias.clone()))
    return grown


@torch.no_grad()
def prune(
    trunk: nn.Module,
    layers: tuple[NodeLayer, ...],
    keep: Mapping[str, torch.Tensor],
    heads: list[nn.Linear],
) -> list[nn.Linear]:
    """Keep only the units ``keep[layer]`` (sorted long indices) of each node layer (in place); return pruned heads.

    Args:
        trunk: the trunk; its producers (and BatchNorms) are replaced by smaller ones.
        layers: its node layers, a chain.
        keep: layer name → indices of the units kept.
        heads: heads reading the last layer (task heads and the template); returned pruned, in order.
    """
    for i, layer in enumerate(layers):
        old = module_at(trunk, layer.name)
        assert isinstance(old, nn.Linear | nn.Conv2d)
        rows = keep[layer.name].to(old.weight.device)
        weight = old.weight[rows]
        if i > 0:
            weight = weight[:, keep[layers[i - 1].name].to(old.weight.device)]
        bias = None if old.bias is None else old.bias[rows].clone()
        _replace(trunk, layer.name, _like(old, weight.clone(), bias))
        if layer.norm is not None:
            norm = module_at(trunk, layer.norm)
            assert isinstance(norm, nn.BatchNorm2d)
            _replace(trunk, layer.norm, _norm(norm, keep[layer.name], 0))
    last = layers[-1]
    columns = column_index(keep[last.name], max(last.head_block, 1))
    return [_linear(head.weight[:, columns.to(head.weight.device)].clone(), head.bias.clone()) for head in heads]


def reshape(trunk: nn.Module, layers: tuple[NodeLayer, ...], widths: Mapping[str, int]) -> None:
    """Give ``trunk``'s node layers ``widths`` (in place), values to be overwritten (e.g. by a state dict)."""
    current = {layer.name: int(module_at(trunk, layer.name).weight.shape[0]) for layer in layers}  # type: ignore[index]
    keep = {name: torch.arange(min(current[name], widths[name])) for name in current}
    prune(trunk, layers, keep, [])
    extra = {name: max(0, widths[name] - current[name]) for name in current}
    omega = {name: torch.zeros(min(current[name], widths[name])) for name in current}
    grow(trunk, layers, extra, [], nn.Linear(1, 1), omega, torch.Generator().manual_seed(0))


def widths_of(trunk: nn.Module, layers: tuple[NodeLayer, ...]) -> list[int]:
    """Widths of the node layers of ``trunk``, in order."""
    return [int(module_at(trunk, layer.name).weight.shape[0]) for layer in layers]  # type: ignore[index]
