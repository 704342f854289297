"""Mega-batch data handling: validation split, replay buffers, augmentation.

All randomness comes from explicit generators (see :mod:`server.engine.lure.seeding`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812

from server.engine.protocol import TaskData


def split_train_val(data: TaskData, val_fraction: float, rng: torch.Generator) -> tuple[TaskData, TaskData]:
    """Split a mega-batch into a training and a validation part (``floor(n * val_fraction)`` samples).

    Args:
        data: the mega-batch.
        val_fraction: share of the validation part, in ``[0, 1)``.
        rng: generator of the permutation.

    Returns:
        ``(train, val)``; ``val`` is empty for tiny mega-batches.
    """
    n = len(data)
    order = torch.randperm(n, generator=rng)
    n_val = min(int(n * val_fraction), n - 1)
    val_idx, train_idx = order[:n_val], order[n_val:]
    return subset(data, train_idx), subset(data, val_idx)


def subset(data: TaskData, index: torch.Tensor) -> TaskData:
    """Samples ``index`` of ``data`` (a copy)."""
    return TaskData(inputs=data.inputs[index], labels=data.labels[index])


def sample_fraction(data: TaskData, fraction: float, rng: torch.Generator, *, minimum: int = 1) -> TaskData:
    """A uniform random subset of ``ceil(fraction * n)`` samples (at least ``minimum``, at most ``n``)."""
    n = len(data)
    count = min(n, max(minimum, math.ceil(fraction * n)))
    return subset(data, torch.randperm(n, generator=rng)[:count])


def reservoir_sample(data: TaskData, size: int, rng: torch.Generator) -> TaskData:
    """A reservoir sample of ``size`` samples of ``data``, kept in stream order.

    Algorithm R over the mega-batch in stream order: every sample ends in the buffer with probability
    ``size / n``, as a reservoir buffer filled while the mega-batch streams in would hold.
    """
    n = len(data)
    if n <= size:
        return TaskData(inputs=data.inputs.clone(), labels=data.labels.clone())
    slots = torch.arange(size)
    # Sample i (0-based, i >= size) replaces slot j ~ U{0..i} when j < size.
    draws = (torch.rand(n - size, generator=rng, dtype=torch.float64) * torch.arange(size + 1, n + 1)).long()
    for offset, j in enumerate(draws.tolist()):
        if j < size:
            slots[j] = size + offset
    return subset(data, torch.sort(slots).values)


def concat(parts: Sequence[TaskData]) -> TaskData:
    """Concatenate task data in order."""
    if len(parts) == 1:
        return parts[0]
    return TaskData(
        inputs=torch.cat([p.inputs for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
    )


def crop_padding(input_shape: Sequence[int]) -> int:
    """Random-crop padding: 4 pixels for 32x32 images, scaled with the image size (at least 1)."""
    return max(1, round(4 * min(input_shape[1:]) / 32))


def augment_batch(inputs: torch.Tensor, padding: int, rng: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, independently per sample.

    Args:
        inputs: ``[n, C, H, W]``.
        padding: pixels of zero padding on each side before cropping back to ``H x W``.
        rng: generator of the offsets and flips.

    Returns:
        The augmented batch ``[n, C, H, W]``.
    """
    n, c, h, w = inputs.shape
    padded = F.pad(inputs, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=rng)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=rng)
    flip = torch.rand(n, generator=rng) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # [n, 1, H, 1]
    cols = dx[:, None] + torch.arange(w)[None, :]  # [n, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # [n, 1, 1, W]
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]
    return padded[batch, channel, rows, cols]
