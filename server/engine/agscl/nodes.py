"""Nodes of a backbone trunk, as AGS-CL sees them, and the operations on their weight groups.

A *node* is an output unit of a ``Linear`` layer or an output channel of a ``Conv2d`` (with its
BatchNorm, when one follows) whose output goes through a ReLU (paper, section 3.1). Its *incoming
group* is its row of the producer's weight (and bias), plus its BatchNorm gain and shift: every
value that decides what the node outputs. Its *outgoing weights* are the matching input columns of
the layers that read it (the *consumers*) and of the task heads.

Per backbone:

* ``mlp``: every hidden ``Linear``; the next one consumes it, the last feeds the heads.
* ``cnn``: both conv-BN pairs; the second conv consumes the first; the second feeds the heads,
  4 head inputs per channel (the 2x2 adaptive pooling is flattened channel-major).
* ``resnet18``/``resnet50``: every conv-BN pair. Inside a residual block the first conv (and the
  bottleneck's middle one) is consumed by the next conv of the block. The convs that write the
  residual stream (stem, the block's last conv, the downsample) share their channels with the
  identity path and every later block, so no single set of outgoing weights belongs to one of
  their nodes: they get the proximal step (sparsify or freeze) and re-initialization, but no
  zeroing of outgoing weights (an adaptation, documented in ``docs/reproduction-agscl.md``).
  For the same reason only the inner convs of a block are *resizable* (capacity growth and
  pruning, :mod:`server.engine.agscl.capacity`): the residual-stream widths stay fixed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from server.engine.training import linear_init_params


@dataclass(frozen=True)
class Consumer:
    """A layer that reads a node layer: module path and how many of its inputs one node feeds."""

    path: str
    block: int = 1


@dataclass(frozen=True)
class NodeLayer:
    """One layer of nodes.

    Attributes:
        name: module path of the producer (``Linear`` or ``Conv2d``) in the trunk.
        norm: module path of the BatchNorm that follows it, or None.
        consumers: the layers that read it (their input columns are its outgoing weights).
        head_block: head inputs per node when it feeds the heads, else 0.
        reinit: whether its free nodes are re-initialized (I.2); False for the convs that write a
            ResNet's residual stream, where a re-initialized channel would reach every later layer
            through the identity path.
    """

    name: str
    norm: str | None
    consumers: tuple[Consumer, ...]
    head_block: int = 0
    reinit: bool = True

    @property
    def resizable(self) -> bool:
        """Whether capacity may add or remove nodes: its output is read only by its consumers and the heads.

        False exactly where :attr:`reinit` is False, for the same reason: a ResNet's residual-stream
        channels are shared with the identity path, every later block and the heads.
        """
        return self.reinit


def node_layers(trunk: nn.Module, backbone: str) -> tuple[NodeLayer, ...]:
    """The node layers of a trunk built by ``backbones.build_backbone(backbone, ...)``, in forward order.

    Raises:
        ValueError: for a backbone AGS-CL does not know.
    """
    modules = dict(trunk.named_modules())
    if backbone == "mlp":
        linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
        return tuple(
            NodeLayer(
                name=name,
                norm=None,
                consumers=(Consumer(linears[i + 1]),) if i + 1 < len(linears) else (),
                head_block=0 if i + 1 < len(linears) else 1,
            )
            for i, name in enumerate(linears)
        )
    if backbone == "cnn":
        return (
            NodeLayer("features.0", "features.1", (Consumer("features.4"),)),
            NodeLayer("features.4", "features.5", (), head_block=4),
        )
    if backbone in ("resnet18", "resnet50"):
        layers = [NodeLayer("conv1", "bn1", (), reinit=False)]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for block_name, _ in modules[stage].named_children():
                prefix = f"{stage}.{block_name}"
                convs = [n for n in ("conv1", "conv2", "conv3") if f"{prefix}.{n}" in modules]
                for i, conv in enumerate(convs):
                    inner = i + 1 < len(convs)
                    consumers = (Consumer(f"{prefix}.{convs[i + 1]}"),) if inner else ()
                    layers.append(NodeLayer(f"{prefix}.{conv}", f"{prefix}.bn{conv[-1]}", consumers, reinit=inner))
                if f"{prefix}.downsample" in modules:
                    layers.append(NodeLayer(f"{prefix}.downsample.0", f"{prefix}.downsample.1", (), reinit=False))
        return tuple(layers)
    raise ValueError(f"AGS-CL does not know the nodes of backbone {backbone!r}")


def module_at(trunk: nn.Module, path: str) -> nn.Module:
    """The submodule of ``trunk`` at dotted ``path``."""
    return trunk.get_submodule(path)


def width_of(trunk: nn.Module, layer: NodeLayer) -> int:
    """Number of nodes of ``layer``."""
    producer = module_at(trunk, layer.name)
    return int(producer.weight.shape[0])  # type: ignore[index]


def group_tensors(trunk: nn.Module, layer: NodeLayer) -> list[torch.Tensor]:
    """The parameters whose first dimension indexes the layer's nodes (its incoming groups)."""
    producer = module_at(trunk, layer.name)
    tensors = [producer.weight]
    if getattr(producer, "bias", None) is not None:
        tensors.append(producer.bias)
    if layer.norm is not None:
        norm = module_at(trunk, layer.norm)
        tensors += [norm.weight, norm.bias]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def group_matrix(trunk: nn.Module, layer: NodeLayer) -> torch.Tensor:
    """Incoming groups ``[nodes, group size]`` (a copy)."""
    tensors = group_tensors(trunk, layer)
    n = tensors[0].shape[0]
    return torch.cat([t.detach().reshape(n, -1) for t in tensors], dim=1)


def set_group_matrix(trunk: nn.Module, layer: NodeLayer, matrix: torch.Tensor) -> None:
    """Write incoming groups ``[nodes, group size]`` back into the layer's parameters (in place)."""
    start = 0
    with torch.no_grad():
        for tensor in group_tensors(trunk, layer):
            size = tensor[0].numel() if tensor.dim() > 1 else 1
            tensor.copy_(matrix[:, start : start + size].reshape(tensor.shape))
            start += size


@torch.no_grad()
def proximal_step(
    trunk: nn.Module,
    layers: tuple[NodeLayer, ...],
    omega: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
    *,
    alpha: float,
    mu: float,
    lamb: float,
) -> dict[str, int]:
    """The closed-form proximal update of equation (7), on every node layer, in place.

    Unimportant nodes (Ω = 0): ``θ ← (1 − αμ/‖θ‖)₊ θ`` (group lasso: exact zeros).
    Important nodes: ``θ ← γθ + (1 − γ)θ̂`` with ``γ = (1 − αλΩ/‖θ − θ̂‖)₊`` (exact freezing).

    Args:
        trunk: the network being trained.
        layers: its node layers.
        omega: layer name → Ω ``[nodes]``.
        anchor: layer name → θ̂, the incoming groups ``[nodes, group size]`` after the previous task.
        alpha: the step size (the learning rate).
        mu: μ.
        lamb: λ.

    Returns:
        ``{"zero_groups": ..., "frozen_groups": ...}``: groups exactly at zero / exactly at θ̂ afterwards.
    """
    zero = frozen = 0
    for layer in layers:
        groups = group_matrix(trunk, layer)
        previous = anchor[layer.name].to(groups.device)
        importance = omega[layer.name].to(groups.device)
        free = importance == 0
        norms = groups.norm(dim=1)
        shrink = (1 - alpha * mu / norms.clamp_min(1e-30)).clamp_min(0)
        drift = (groups - previous).norm(dim=1)
        pull = (1 - alpha * lamb * importance / drift.clamp_min(1e-30)).clamp_min(0)
        pulled = pull[:, None] * groups + (1 - pull[:, None]) * previous
        updated = torch.where(free[:, None], shrink[:, None] * groups, pulled)
        set_group_matrix(trunk, layer, updated)
        zero += int((free & (shrink == 0)).sum())
        frozen += int((~free & (pull == 0)).sum())
    return {"zero_groups": zero, "frozen_groups": frozen}


def column_index(nodes: torch.Tensor, block: int) -> torch.Tensor:
    """Consumer input columns of node indices ``nodes`` when each node feeds ``block`` consecutive inputs."""
    if block == 1:
        return nodes
    return (nodes[:, None] * block + torch.arange(block, device=nodes.device)).reshape(-1)


def fixed_zero_masks(
    trunk: nn.Module, layers: tuple[NodeLayer, ...], omega: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Consumer path → bool mask of its weight, True where the weight is fixed at zero (I.1).

    An important consumer node (Ω > 0) never reads an unimportant node (Ω = 0): that weight was
    zeroed when the node became unimportant and stays zero, so what later tasks teach the free
    node cannot reach the important one (negative transfer, section 2).
    """
    by_name = {layer.name: layer for layer in layers}
    masks: dict[str, torch.Tensor] = {}
    for layer in layers:
        free = omega[layer.name] == 0
        for consumer in layer.consumers:
            weight = module_at(trunk, consumer.path).weight
            assert isinstance(weight, torch.Tensor)
            important_rows = omega[by_name[consumer.path].name] > 0
            free_columns = free.repeat_interleave(consumer.block) if consumer.block > 1 else free
            mask = important_rows[:, None] & free_columns[None, :]  # [out, in]
            while mask.dim() < weight.dim():
                mask = mask[..., None]
            masks[consumer.path] = mask.expand_as(weight).to(weight.device)
    return masks


@torch.no_grad()
def apply_masks(trunk: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set every weight that ``masks`` fixes at zero to zero (in place)."""
    for path, mask in masks.items():
        weight = module_at(trunk, path).weight
        assert isinstance(weight, torch.Tensor)
        weight.masked_fill_(mask, 0.0)


@torch.no_grad()
def zero_outgoing(
    trunk: nn.Module,
    layers: tuple[NodeLayer, ...],
    nodes: Mapping[str, torch.Tensor],
    heads: list[nn.Linear],
) -> None:
    """(I.1) Zero the outgoing weights of ``nodes`` (layer name → bool ``[nodes]``): consumer and head columns."""
    for layer in layers:
        chosen = nodes[layer.name].nonzero().flatten()
        if chosen.numel() == 0:
            continue
        for consumer in layer.consumers:
            weight = module_at(trunk, consumer.path).weight
            assert isinstance(weight, torch.Tensor)
            weight[:, column_index(chosen.to(weight.device), consumer.block)] = 0.0
        if layer.head_block:
            for head in heads:
                head.weight[:, column_index(chosen.to(head.weight.device), layer.head_block)] = 0.0


@torch.no_grad()
def silent_nodes(trunk: nn.Module, layers: tuple[NodeLayer, ...], heads: list[nn.Linear]) -> dict[str, torch.Tensor]:
    """Layer name → bool ``[nodes]``: True where no weight carries the node's output towards ``heads``.

    A node is silent when every outgoing weight is zero, except weights into consumer nodes that are
    silent themselves (free nodes may read free nodes, I.1 only cuts them from important ones).
    Nodes of layers that write a ResNet's residual stream are never silent: the identity path
    carries them whatever their weights. Removing silent nodes changes no prediction of ``heads``.
    """
    found: dict[str, torch.Tensor] = {}
    for layer in reversed(layers):  # consumers before the layers they read
        width = width_of(trunk, layer)
        if not layer.resizable:
            found[layer.name] = torch.zeros(width, dtype=torch.bool)
            continue
        silent = torch.ones(width, dtype=torch.bool)
        readers: list[tuple[torch.Tensor, int]] = []
        for consumer in layer.consumers:
            weight = module_at(trunk, consumer.path).weight
            assert isinstance(weight, torch.Tensor)
            quiet = found.get(consumer.path)  # the consumer's own nodes, when it is a node layer
            readers.append((weight if quiet is None else weight[~quiet.to(weight.device)], consumer.block))
        readers += [(head.weight, layer.head_block) for head in heads] if layer.head_block else []
        for weight, block in readers:
            if weight.shape[0] == 0:  # every node of the consumer is silent
                continue
            per_column = weight.abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)
            silent &= (per_column.reshape(-1, block).amax(dim=1) == 0).cpu()
        found[layer.name] = silent
    return found


def fresh_rows(module: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """Freshly initialized parameters of ``module`` as at construction (CPU), drawn from ``generator``.

    ``Linear``: PyTorch's default; ``Conv2d``: Kaiming-normal, fan-out, ReLU (every conv backbone's init);
    BatchNorm: gain 1, shift 0.
    """
    if isinstance(module, nn.Linear):
        weight, bias = linear_init_params(module.in_features, module.out_features, generator)
        return [weight, bias] if module.bias is not None else [weight]
    if isinstance(module, nn.Conv2d):
        weight = torch.empty(module.weight.shape)
        fan_out = weight.shape[0] * weight[0][0].numel()
        weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
        if module.bias is not None:
            return [weight, torch.zeros(module.bias.shape)]
        return [weight]
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        return [torch.ones(module.num_features), torch.zeros(module.num_features)]
    raise ValueError(f"cannot initialize a {type(module).__name__}")


@torch.no_grad()
def reinitialize_incoming(trunk: nn.Module, layer: NodeLayer, nodes: torch.Tensor, generator: torch.Generator) -> None:
    """(I.2) Re-initialize the incoming groups of ``nodes`` (bool ``[nodes]``) as at construction."""
    chosen = nodes.nonzero().flatten()
    if chosen.numel() == 0:
        return
    fresh = fresh_rows(module_at(trunk, layer.name), generator)
    if layer.norm is not None:
        fresh += fresh_rows(module_at(trunk, layer.norm), generator)
    for tensor, init in zip(group_tensors(trunk, layer), fresh, strict=True):
        index = chosen.to(tensor.device)
        tensor[index] = init.to(tensor.device, tensor.dtype)[chosen]


class ActivationMeter:
    """Mean ReLU activation per node over the samples run through the trunk while it is attached.

    Hooks the output of each layer's BatchNorm (or of the producer when there is none) and applies
    the ReLU that follows it; conv nodes average over positions too (one value per channel).
    """

    def __init__(self, trunk: nn.Module, layers: tuple[NodeLayer, ...]) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._handles = []
        for layer in layers:
            module = module_at(trunk, layer.norm or layer.name)
            self._handles.append(module.register_forward_hook(self._hook(layer.name)))

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def record(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            active = torch.relu(output.detach()).double()  # [b, nodes] or [b, nodes, H, W]
            per_node = active.reshape(active.shape[0], active.shape[1], -1).mean(dim=2).sum(dim=0)
            self._sums[name] = self._sums.get(name, torch.zeros_like(per_node)) + per_node

        return record

    def add_samples(self, count: int) -> None:
        """Count ``count`` samples just run through the trunk."""
        self._count += count

    def means(self) -> dict[str, torch.Tensor]:
        """Layer name → mean activation per node ``[nodes]`` (float32, CPU)."""
        return {name: (total / max(self._count, 1)).float().cpu() for name, total in self._sums.items()}

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
