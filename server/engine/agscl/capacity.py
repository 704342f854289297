"""Capacity: growing and pruning the node layers of a trunk (seed on dynamic model size).

Growth (seed section 4.2.2): every resizable node layer gets k % more units (``Linear`` outputs or
conv channels, with their BatchNorm); the old weights are copied, the new ones are initialized as at
construction (from a seeded generator), except the weights from a new unit into a node whose output
must not change: an *important* node of a consumer (Ω > 0; a new unit is free, and AGS-CL never lets
a free node feed an important one, I.1), and every node of a consumer that writes a ResNet's
residual stream (its channels reach the heads through the identity path whatever their Ω). The
heads of existing tasks read nothing from new units (zero columns), and new BatchNorm channels
start with the statistics of a fresh layer, so growth changes no prediction.

Pruning (seed section 4.2.1, "unit pruning"): after an unlearn frees units, free units are removed
down to a reserve. A free unit's outgoing weights, into every consumer node and into the heads,
were zeroed when it became free (I.1, and on release), so removing it changes no prediction either.

Which layers resize (:attr:`~server.engine.agscl.nodes.NodeLayer.resizable`): every node layer of
``mlp`` and ``cnn`` (a chain, each consumed by the next and the last by the heads); in a ResNet the
inner convs of each block (a basic block's ``conv1``, a bottleneck's ``conv1`` and ``conv2``), read
only by the next conv of the block. The convs that write the residual stream (stem, each block's
last conv, the downsample) keep their width: their channels are added to the identity path and read
by every later block and the heads, so a unit of theirs has no outgoing weights of its own to zero.
They still take the new input columns of a grown inner conv (zero). Each consumer reads exactly one
node layer (:attr:`~server.engine.agscl.nodes.NodeLayer.consumers`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from server.engine.agscl.nodes import Consumer, NodeLayer, column_index, fresh_rows, module_at


def _replace(trunk: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in place of the module there, in the same mode (training or eval)."""
    parent_path, _, child = path.rpartition(".")
    parent = trunk.get_submodule(parent_path) if parent_path else trunk
    module.train(trunk.get_submodule(path).training)
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
    assert isinstance(old, nn.Conv2d) and old.groups == 1
    module = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        kernel_size=old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        bias=bias is not None,
        padding_mode=old.padding_mode,
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


def _sources(layers: tuple[NodeLayer, ...]) -> dict[str, tuple[NodeLayer, Consumer]]:
    """Consumer path → the node layer it reads and how (each consumer reads one node layer)."""
    return {consumer.path: (layer, consumer) for layer in layers for consumer in layer.consumers}


def _head_layer(layers: tuple[NodeLayer, ...]) -> NodeLayer | None:
    """The node layer the heads read column by column (None for a ResNet, whose heads read the residual stream)."""
    return next((layer for layer in layers if layer.head_block), None)


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
        trunk: the trunk; its producers (and BatchNorms) are replaced by larger ones, and so are the
            consumers of grown layers (new input columns).
        layers: its node layers; ``extra`` may name only resizable ones.
        extra: layer name → units to add (missing: none).
        heads: the task heads; returned with zero columns for the new units (not modified).
        template: the head new tasks start from; returned last, grown with freshly initialized columns.
        omega: layer name → Ω ``[old nodes]``; new units' weights into important nodes are zero, as
            are their weights into every node of a layer that is not resizable (residual stream).
        generator: draws the new weights.

    Raises:
        ValueError: if ``extra`` adds units to a layer that is not resizable.
    """
    fixed = [layer.name for layer in layers if not layer.resizable and extra.get(layer.name, 0)]
    if fixed:
        raise ValueError(f"cannot grow node layers {fixed}: they write a residual stream")
    sources = _sources(layers)
    for layer in layers:
        old = module_at(trunk, layer.name)
        assert isinstance(old, nn.Linear | nn.Conv2d)
        source = sources.get(layer.name)
        out_old, in_old = old.weight.shape[:2]
        out_new = out_old + extra.get(layer.name, 0)
        in_new = in_old + (extra.get(source[0].name, 0) * source[1].block if source else 0)
        if out_new == out_old and in_new == in_old:
            continue
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
        if in_new > in_old:
            # Nodes whose output must not change read nothing from the new units.
            shielded = omega[layer.name].to(weight.device) > 0 if layer.resizable else slice(None)
            weight[:out_old, in_old:][shielded] = 0.0
        _replace(trunk, layer.name, _like(old, weight, bias))
        if layer.norm is not None and out_new > out_old:
            norm = module_at(trunk, layer.norm)
            assert isinstance(norm, nn.BatchNorm2d)
            _replace(trunk, layer.norm, _norm(norm, None, out_new - out_old))
    read = _head_layer(layers)
    added = extra.get(read.name, 0) * read.head_block if read is not None else 0
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
        trunk: the trunk; its producers (and BatchNorms) are replaced by smaller ones, and so are the
            consumers of pruned layers (fewer input columns).
        layers: its node layers; ``keep`` may drop units only of resizable ones.
        keep: layer name → indices of the units kept (missing: all).
        heads: heads reading the head layer (task heads and the template); returned pruned, in order.

    Raises:
        ValueError: if ``keep`` drops units of a layer that is not resizable.
    """
    widths = {layer.name: int(module_at(trunk, layer.name).weight.shape[0]) for layer in layers}  # type: ignore[index]
    rows = {name: keep.get(name, torch.arange(width)).cpu() for name, width in widths.items()}
    fixed = [layer.name for layer in layers if not layer.resizable and rows[layer.name].numel() != widths[layer.name]]
    if fixed:
        raise ValueError(f"cannot prune node layers {fixed}: they write a residual stream")
    sources = _sources(layers)
    for layer in layers:
        old = module_at(trunk, layer.name)
        assert isinstance(old, nn.Linear | nn.Conv2d)
        source = sources.get(layer.name)
        kept_rows = rows[layer.name]
        columns = column_index(rows[source[0].name], source[1].block) if source else torch.arange(old.weight.shape[1])
        if kept_rows.numel() == old.weight.shape[0] and columns.numel() == old.weight.shape[1]:
            continue
        weight = old.weight[kept_rows.to(old.weight.device)][:, columns.to(old.weight.device)]
        bias = None if old.bias is None else old.bias[kept_rows.to(old.weight.device)].clone()
        _replace(trunk, layer.name, _like(old, weight.clone(), bias))
        if layer.norm is not None and kept_rows.numel() != widths[layer.name]:
            norm = module_at(trunk, layer.norm)
            assert isinstance(norm, nn.BatchNorm2d)
            _replace(trunk, layer.norm, _norm(norm, kept_rows, 0))
    read = _head_layer(layers)
    if read is None:
        return [_linear(head.weight.clone(), head.bias.clone()) for head in heads]
    columns = column_index(rows[read.name], read.head_block)
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
