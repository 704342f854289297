"""Capacity: growing and pruning the hidden layers of an ``mlp`` trunk (seed on dynamic model size).

Growth (seed section 4.2.2): every hidden layer gets k % more units; the old weights are copied,
the new ones are initialized as at construction (PyTorch's ``Linear`` init, from a seeded
generator), except the weights from a new unit into an *important* node of the next layer, which
are zero: a new unit is free (Ω = 0), and AGS-CL never lets a free node feed an important one (I.1).
The heads of existing tasks read nothing from new units (zero columns), so growth changes no
prediction.

Pruning (seed section 4.2.1, "unit pruning"): after an unlearn frees units, free units are removed
down to a reserve. A free unit's outgoing weights into important nodes and into the heads are zero
(I.1), so removing it changes no prediction either.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from server.engine.agscl.nodes import NodeLayer, module_at
from server.engine.training import linear_init_params


def _replace(trunk: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = trunk.get_submodule(parent_path) if parent_path else trunk
    setattr(parent, child, module)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    module = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    module.weight = nn.Parameter(weight)
    module.bias = nn.Parameter(bias)
    return module


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
    """Add ``extra[layer]`` units to each hidden layer of an ``mlp`` trunk (in place); return the grown heads.

    Args:
        trunk: the trunk; its ``Linear`` modules are replaced by larger ones.
        layers: its node layers (``Linear`` producers, each consumed by the next, the last by the heads).
        extra: layer name → units to add.
        heads: the task heads; returned with zero columns for the new units (not modified).
        template: the head new tasks start from; returned last, grown with freshly initialized columns.
        omega: layer name → Ω ``[old nodes]``; new units' weights into important nodes are zero.
        generator: draws the new weights.

    Returns:
        The grown task heads, in order, then the grown template.
    """
    sizes = {layer.name: int(module_at(trunk, layer.name).weight.shape[0]) for layer in layers}  # type: ignore[index]
    for i, layer in enumerate(layers):
        old = module_at(trunk, layer.name)
        assert isinstance(old, nn.Linear)
        previous = layers[i - 1].name if i > 0 else None
        out_old, in_old = old.weight.shape
        out_new = out_old + extra.get(layer.name, 0)
        in_new = in_old + (extra.get(previous, 0) if previous else 0)
        weight, bias = linear_init_params(in_new, out_new, generator)
        weight, bias = weight.to(old.weight.device), bias.to(old.weight.device)
        weight[:out_old, :in_old] = old.weight
        bias[:out_old] = old.bias
        if previous is not None and in_new > in_old:
            important = omega[layer.name].to(weight.device) > 0  # [out_old]
            weight[:out_old, in_old:][important] = 0.0
        _replace(trunk, layer.name, _linear(weight, bias))
    last = layers[-1].name
    added = extra.get(last, 0)
    grown: list[nn.Linear] = []
    for head in heads:
        weight = torch.cat([head.weight, head.weight.new_zeros(head.out_features, added)], dim=1)
        grown.append(_linear(weight, head.bias.clone()))
    weight, _ = linear_init_params(sizes[last] + added, template.out_features, generator)
    weight = weight.to(template.weight.device)
    weight[:, : sizes[last]] = template.weight
    grown.append(_linear(weight, template.bias.clone()))
    return grown


@torch.no_grad()
def prune(
    trunk: nn.Module,
    layers: tuple[NodeLayer, ...],
    keep: Mapping[str, torch.Tensor],
    heads: list[nn.Linear],
) -> list[nn.Linear]:
    """Keep only the units ``keep[layer]`` (sorted long indices) of each hidden layer (in place); return pruned heads.

    Args:
        trunk: the trunk; its ``Linear`` modules are replaced by smaller ones.
        layers: its node layers.
        keep: layer name → indices of the units kept.
        heads: heads reading the last layer (task heads and the template); returned pruned, in order.
    """
    for i, layer in enumerate(layers):
        old = module_at(trunk, layer.name)
        assert isinstance(old, nn.Linear)
        rows = keep[layer.name].to(old.weight.device)
        weight = old.weight[rows]
        if i > 0:
            weight = weight[:, keep[layers[i - 1].name].to(old.weight.device)]
        _replace(trunk, layer.name, _linear(weight.clone(), old.bias[rows].clone()))
    columns = keep[layers[-1].name]
    return [_linear(head.weight[:, columns.to(head.weight.device)].clone(), head.bias.clone()) for head in heads]


def mlp_widths(trunk: nn.Module, layers: tuple[NodeLayer, ...]) -> list[int]:
    """Hidden widths of an ``mlp`` trunk, in order."""
    return [int(module_at(trunk, layer.name).weight.shape[0]) for layer in layers]  # type: ignore[index]
