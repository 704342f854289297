"""Connection importance (SNIP, Fisher, magnitude, random) and top-fraction masks.

The *connections* are the weight tensors of the convolution and linear layers, as in SNIP (Lee et al.,
2018) which LURE builds on; biases and normalization parameters are not scored and are never
re-initialized by the importance reset.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from server.engine.protocol import TaskData

#: Modules whose ``weight`` is a tensor of connections.
CONNECTION_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def connection_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight tensors of the model's convolution and linear layers, by parameter name, in module order."""
    weights: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, CONNECTION_LAYERS) and isinstance(weight, nn.Parameter):
            weights[f"{module_name}.weight" if module_name else "weight"] = weight
    return weights


def importance_scores(
    model: nn.Module,
    kind: str,
    data: TaskData,
    *,
    batch_size: int,
    device: torch.device,
    rng: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Score every connection weight; higher means more important.

    * ``snip``: ``|∂L/∂w ⊙ w|`` with ``L`` the mean cross-entropy over ``data`` (Lee et al., 2018;
      the LURE paper's eq. 2 -- the normalization by the sum does not change the ranking).
    * ``fisher``: diagonal empirical Fisher, approximated by the sum over mini-batches of squared
      mini-batch gradients.
    * ``magnitude``: ``|w|`` (data-free).
    * ``random``: uniform noise from ``rng`` (data-free).

    Gradients are taken in training mode (batch statistics, as the loss is seen in training); the
    model's buffers (BatchNorm running statistics) are restored afterwards, its ``.grad`` fields are not
    touched, and its parameters are left unchanged.

    Args:
        model: the network, on ``device``.
        kind: ``snip``, ``fisher``, ``magnitude`` or ``random``.
        data: samples to score on (ignored by the data-free kinds).
        batch_size: chunk size of the gradient computation.
        device: where the model lives.
        rng: generator of the ``random`` scores.

    Returns:
        One score tensor per entry of :func:`connection_weights`, same shapes, on the CPU.
    """
    weights = connection_weights(model)
    if kind == "magnitude":
        return {name: w.detach().abs().cpu() for name, w in weights.items()}
    if kind == "random":
        return {name: torch.rand(w.shape, generator=rng) for name, w in weights.items()}
    if kind not in ("snip", "fisher"):
        raise ValueError(f"importance must be one of snip, fisher, magnitude, random, got {kind!r}")
    if len(data) == 0:
        raise ValueError("importance needs at least one sample")

    params = list(weights.values())
    totals = [torch.zeros_like(p) for p in params]
    saved = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    n = len(data)
    chunks = list(torch.split(torch.arange(n), batch_size))
    if len(chunks) > 1 and chunks[-1].numel() == 1:  # BatchNorm cannot take a batch of one
        chunks[-2:] = [torch.cat(chunks[-2:])]
    model.train()
    try:
        for index in chunks:
            x, y = data.inputs[index], data.labels[index]
            logits = model(x.to(device, torch.float32))
            if kind == "snip":
                # Sum-reduced and divided by n: the chunks add up to the gradient of the mean loss.
                loss = F.cross_entropy(logits, y.to(device), reduction="sum") / n
                grads = torch.autograd.grad(loss, params)
                for total, grad in zip(totals, grads, strict=True):
                    total.add_(grad)
            else:
                loss = F.cross_entropy(logits, y.to(device))
                grads = torch.autograd.grad(loss, params)
                for total, grad in zip(totals, grads, strict=True):
                    total.addcmul_(grad, grad)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
        model.train(was_training)
    if kind == "snip":
        return {
            name: (total * p.detach()).abs().cpu() for (name, p), total in zip(weights.items(), totals, strict=True)
        }
    return {name: total.cpu() for name, total in zip(weights, totals, strict=True)}


def top_fraction_masks(scores: dict[str, torch.Tensor], fraction: float, scope: str) -> dict[str, torch.Tensor]:
    """Mark the ``round(fraction * count)`` highest-scoring entries.

    Ties are broken by position (lower index first), so the mask is deterministic.

    Args:
        scores: score tensors by parameter name.
        fraction: share to mark, in ``[0, 1]``.
        scope: ``global`` ranks all tensors together (SNIP and the LURE paper: ``s_j`` is normalized over
            all ``m`` connections and the top ``k`` kept); ``layer`` marks the fraction of each tensor.

    Returns:
        Boolean masks with the shapes of ``scores``; True = among the top fraction.
    """
    if scope == "layer":
        return {name: _top_mask(score.flatten(), fraction).view_as(score) for name, score in scores.items()}
    if scope != "global":
        raise ValueError(f"keep_scope must be one of global, layer, got {scope!r}")
    if not scores:
        return {}
    flat = _top_mask(torch.cat([s.flatten() for s in scores.values()]), fraction)
    masks: dict[str, torch.Tensor] = {}
    offset = 0
    for name, score in scores.items():
        masks[name] = flat[offset : offset + score.numel()].view_as(score)
        offset += score.numel()
    return masks


def _top_mask(flat: torch.Tensor, fraction: float) -> torch.Tensor:
    """True at the ``round(fraction * n)`` largest entries; ties at the threshold go to the lowest indices.

    A selection (``kthvalue``) rather than a sort: linear time, which matters for tens of millions of weights.
    """
    n = flat.numel()
    count = round(fraction * n)
    if count <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if count >= n:
        return torch.ones(n, dtype=torch.bool)
    values = torch.nan_to_num(flat.detach().float().cpu(), nan=-math.inf)
    threshold = torch.kthvalue(values, n - count + 1).values  # the count-th largest value
    mask = values > threshold
    ties = torch.nonzero(values == threshold).flatten()[: count - int(mask.sum())]
    mask[ties] = True
    return mask
