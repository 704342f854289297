"""Weight resets applied before a new mega-batch: LURE's selective re-initialization and its baselines.

Every reset takes a *fresh* network -- the same backbone built again with the backbone's own
initializer under a derived seed -- as the source of re-initialized values, so re-initialized
weights are exactly what a new network would hold at those positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from server.engine.lure.importance import importance_scores, top_fraction_masks
from server.engine.protocol import TaskData


def reinit_where(model: nn.Module, fresh: nn.Module, reset_masks: dict[str, torch.Tensor]) -> int:
    """Copy the fresh network's values into ``model`` where a mask is True.

    Args:
        model: the network to reset, in place.
        fresh: a freshly initialized network of the same architecture.
        reset_masks: boolean masks by parameter name; True = re-initialize.

    Returns:
        The number of re-initialized values.
    """
    params = dict(model.named_parameters())
    fresh_params = dict(fresh.named_parameters())
    count = 0
    with torch.no_grad():
        for name, mask in reset_masks.items():
            target = params[name]
            mask_on_device = mask.to(target.device)
            target.copy_(torch.where(mask_on_device, fresh_params[name].to(target.device), target))
            count += int(mask.sum())
    return count


def shrink_perturb(model: nn.Module, fresh: nn.Module, shrink: float, perturb: float) -> None:
    """θ ← λ·θ + σ·θ_fresh for every parameter (Ash & Adams, 2020).

    The noise is a fresh initialization, so each layer's noise has that layer's initialization scale;
    buffers (BatchNorm running statistics) are left alone, as in the original method.
    """
    fresh_params = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.mul_(shrink).add_(fresh_params[name].to(param.device), alpha=perturb)


def reinit_modules(model: nn.Module, fresh: nn.Module, module_names: list[str]) -> int:
    """Replace every parameter and buffer of the named submodules by the fresh network's.

    Returns:
        The number of re-initialized parameter values.
    """
    prefixes = tuple(f"{name}." for name in module_names)
    fresh_state = fresh.state_dict()
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(prefixes):
                param.copy_(fresh_state[name])
                count += param.numel()
        for name, buffer in model.named_buffers():
            if name.startswith(prefixes):
                buffer.copy_(fresh_state[name])
    return count


def head_modules(model: nn.Module) -> list[str]:
    """The classification head: the module named by the backbone's ``head_name``."""
    head = getattr(model, "head_name", None)
    if not isinstance(head, str):
        raise ValueError("the backbone does not name its head (attribute head_name)")
    model.get_submodule(head)  # fails loudly on a wrong name
    return [head]


def later_layer_modules(model: nn.Module) -> list[str]:
    """The "later layers" of later-layer forgetting (Zhou et al., 2022), head included.

    * torchvision ResNets: ``layer3``, ``layer4`` and the head -- "blocks 3 and 4", as in the LURE paper.
    * any other backbone: the later half (rounded up) of its weight layers (convolution and linear
      layers in definition order), each with the normalization layers that follow it: for the ``mlp``
      (two hidden layers and a head) the second hidden layer and the head, for the ``cnn`` (two
      conv-BN blocks and a head) the second conv block and the head.
    """
    head = head_modules(model)[0]
    children = dict(model.named_children())
    if "layer3" in children and "layer4" in children:
        return ["layer3", "layer4", head]
    groups: list[list[str]] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            groups.append([name])
        elif groups and any(True for _ in module.parameters(recurse=False)) and not list(module.children()):
            groups[-1].append(name)  # normalization (or other) layer following a weight layer
    later = groups[len(groups) // 2 :]
    names = [name for group in later for name in group]
    return names if head in names else [*names, head]


@dataclass(frozen=True)
class ResetOutcome:
    """What a reset did.

    Attributes:
        reinitialized: parameter values replaced by (or, for shrink-perturb, mixed with) fresh ones.
        total: parameter values of the model.
        importance_seconds: time spent scoring importance and ranking (``lure`` only, else 0).
        masks: ``lure`` only: per connection weight, True where the value was re-initialized.
    """

    reinitialized: int
    total: int
    importance_seconds: float = 0.0
    masks: dict[str, torch.Tensor] | None = None


def apply_reset(
    kind: str,
    model: nn.Module,
    fresh: nn.Module,
    data: TaskData,
    *,
    importance: str = "snip",
    keep_fraction: float = 0.8,
    keep_scope: str = "global",
    shrink: float = 0.4,
    perturb: float = 0.1,
    batch_size: int = 64,
    device: torch.device | None = None,
    rng: torch.Generator | None = None,
) -> ResetOutcome:
    """Apply one of the resets to ``model`` in place.

    * ``lure``: score the connection weights with ``importance`` on ``data``, keep the top
      ``keep_fraction`` (over all weights for ``keep_scope="global"``, per tensor for ``layer``) and
      re-initialize the rest from ``fresh``.
    * ``warm-start``: nothing.
    * ``shrink-perturb``: θ ← ``shrink``·θ + ``perturb``·θ_fresh for every parameter.
    * ``llf``: every parameter and buffer of :func:`later_layer_modules` from ``fresh``.
    * ``fc``: every parameter of the head from ``fresh``.

    Args:
        kind: the reset (``lure``, ``warm-start``, ``shrink-perturb``, ``llf``, ``fc``).
        model: the trained network, on ``device``.
        fresh: a freshly initialized network of the same architecture (any device).
        data: samples for the data-dependent importances (the LURE paper: 20% of the new mega-batch).
        importance: ``snip``, ``fisher``, ``magnitude`` or ``random``.
        keep_fraction: share of connection weights kept by ``lure``.
        keep_scope: ``global`` or ``layer``.
        shrink: shrink-perturb λ.
        perturb: shrink-perturb σ.
        batch_size: chunk size of the importance gradients.
        device: where ``model`` lives (default: where its first parameter is).
        rng: generator of ``random`` importance.

    Returns:
        What was reset.
    """
    total = sum(p.numel() for p in model.parameters())
    if device is None:
        device = next(model.parameters()).device
    if kind == "warm-start":
        return ResetOutcome(0, total)
    if kind == "lure":
        started = time.perf_counter()
        scores = importance_scores(
            model,
            importance,
            data,
            batch_size=batch_size,
            device=device,
            rng=rng if rng is not None else torch.Generator(),
        )
        keep = top_fraction_masks(scores, keep_fraction, keep_scope)
        seconds = time.perf_counter() - started
        masks = {name: ~mask for name, mask in keep.items()}
        return ResetOutcome(reinit_where(model, fresh, masks), total, seconds, masks)
    if kind == "shrink-perturb":
        shrink_perturb(model, fresh, shrink, perturb)
        return ResetOutcome(total, total)
    if kind == "llf":
        return ResetOutcome(reinit_modules(model, fresh, later_layer_modules(model)), total)
    if kind == "fc":
        return ResetOutcome(reinit_modules(model, fresh, head_modules(model)), total)
    raise ValueError(f"reset must be one of lure, warm-start, shrink-perturb, llf, fc, got {kind!r}")
