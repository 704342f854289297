"""Standalone networks: what a predictor's optional ``network(task)`` verb returns (see ``protocol.py``).

A standalone network is a private CPU float32 eval-mode module, gradients off, whose
``forward(x)`` for ``x`` ``[n, *input_shape]`` returns the logits ``predict`` returns. It shares
no tensor with the serving snapshot, so a caller may trace, script, export or move it freely.
"""

# No ``from __future__ import annotations``: torch.jit.script reads MaskedLogits' class annotations, and they must be
# objects, not strings.
import copy
from collections.abc import Mapping

import torch
from torch import nn


class MaskedLogits(nn.Module):
    """A backbone whose logits of the classes a task never saw are ``-inf``, as task-incremental predicts answer.

    Args:
        backbone: the network; maps ``[n, *input_shape]`` to logits ``[n, num_classes]``.
        seen_classes: bool ``[num_classes]``, True at the classes the task has seen.

    State dict: the backbone's entries prefixed ``backbone.``, and the buffer ``seen_classes``.
    """

    seen_classes: torch.Tensor

    def __init__(self, backbone: nn.Module, seen_classes: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("seen_classes", seen_classes.to(torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, num_classes]`` of ``x`` ``[n, *input_shape]``; unseen classes ``-inf``."""
        return self.backbone(x).masked_fill(~self.seen_classes, float("-inf"))


def standalone(module: nn.Module, seen_classes: torch.Tensor | None = None) -> nn.Module:
    """A private CPU float32 eval-mode copy of ``module``, wrapped in :class:`MaskedLogits` when some class is unseen.

    Args:
        module: the served network (any device, any floating dtype); only read.
        seen_classes: bool ``[num_classes]``; None, or all True, means no logit is masked.
    """
    copied = copy.deepcopy(module)
    return _finish(copied, seen_classes)


def standalone_from_state(
    skeleton: nn.Module, state: Mapping[str, torch.Tensor], seen_classes: torch.Tensor | None = None
) -> nn.Module:
    """:func:`standalone` for a structure and its tensors kept apart (e.g. a ``meta`` skeleton and generated weights).

    Args:
        skeleton: the structure; copied, never modified.
        state: every parameter and buffer of ``skeleton``, name → tensor; copied.
        seen_classes: as for :func:`standalone`.
    """
    copied = copy.deepcopy(skeleton)
    # Private CPU copies: generated parameters may be views of one flat tensor on an accelerator.
    private = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()}
    copied.load_state_dict(private, assign=True)
    return _finish(copied, seen_classes)


def with_mask(network: nn.Module, seen_classes: torch.Tensor | None) -> nn.Module:
    """``network`` wrapped in :class:`MaskedLogits` (eval mode) when some class is unseen, else ``network`` itself.

    Args:
        network: a standalone network; taken, not copied.
        seen_classes: bool ``[num_classes]``; None, or all True, means no logit is masked.
    """
    if seen_classes is None or bool(seen_classes.all()):
        return network
    return MaskedLogits(network, seen_classes.detach().to("cpu", copy=True)).eval().requires_grad_(False)


def _finish(module: nn.Module, seen_classes: torch.Tensor | None) -> nn.Module:
    # Module.to(dtype) casts floating tensors only: BatchNorm's int64 batch counter stays int64.
    return with_mask(module.to(device="cpu", dtype=torch.float32).eval().requires_grad_(False), seen_classes)
