"""The explicit training loop of one mega-batch (no trainer framework) and batched inference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from server.engine.lure.data import augment_batch
from server.engine.protocol import Progress, TaskData, no_progress
from server.engine.temporary import distillation_loss
from server.engine.training import minibatches


@dataclass(frozen=True)
class Distillation:
    """Logit matching to a side network during a commit (CLPU-DER++), aligned with the training data.

    Attributes:
        teacher: the side network's logits ``[n, num_classes]`` (any finite value on rows without one).
        rows: bool ``[n]``, True at the rows that have teacher logits (the committed task's samples).
        classes: int64 indices of the task's classes, the columns matched.
        weight: the term's weight relative to cross-entropy.
    """

    teacher: torch.Tensor
    rows: torch.Tensor
    classes: torch.Tensor
    weight: float


@dataclass(frozen=True)
class TrainSettings:
    """How one mega-batch is trained.

    Attributes:
        epochs: passes over the training data.
        batch_size: samples per SGD step.
        lr: initial learning rate of the step schedule (restarted for every mega-batch).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        milestones: epochs at which the learning rate is multiplied by ``gamma``.
        gamma: step-schedule factor.
        crop_padding: random-crop padding in pixels; 0 disables augmentation.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    milestones: tuple[int, ...]
    gamma: float
    crop_padding: int = 0


def step_milestones(epochs: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Scale the paper's schedule (decay at epochs 20 and 40 of 50) to ``epochs``.

    Returns:
        Distinct decay epochs in ``[1, epochs)``.
    """
    return tuple(sorted({m for m in (round(f * epochs) for f in fractions) if 0 < m < epochs}))


def train(
    model: nn.Module,
    data: TaskData,
    settings: TrainSettings,
    *,
    device: torch.device,
    rng: torch.Generator,
    progress: Progress = no_progress,
    distillation: Distillation | None = None,
) -> float:
    """Train ``model`` in place with SGD and a step schedule; the optimizer is new for every call.

    Args:
        model: the network, on ``device``.
        data: training samples on the CPU; shuffled every epoch with ``rng``.
        settings: optimizer, schedule and augmentation settings.
        device: where the model lives.
        rng: generator of the shuffles and augmentations.
        progress: called after every step with the fraction of this training done.
        distillation: adds ``weight`` times the mean squared error between the model's and the
            teacher's logits over ``classes``, on the rows that have teacher logits.

    Returns:
        Mean training loss of the last epoch (NaN when ``epochs`` is 0).
    """
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(settings.milestones), gamma=settings.gamma
    )
    n = len(data)
    steps_per_epoch = len(minibatches(n, settings.batch_size, torch.Generator()))
    total_steps = settings.epochs * steps_per_epoch
    last_loss = math.nan
    loss_sum = torch.zeros((), device=device)
    model.train()
    for epoch in range(settings.epochs):
        loss_sum.zero_()
        # A trailing batch of one sample is merged into the previous one (BatchNorm needs two).
        for step, index in enumerate(minibatches(n, settings.batch_size, rng)):
            x = data.inputs[index]
            if settings.crop_padding > 0:
                x = augment_batch(x, settings.crop_padding, rng)
            y = data.labels[index].to(device)
            logits = model(x.to(device, torch.float32))
            loss = F.cross_entropy(logits, y)
            if distillation is not None:
                rows = distillation.rows[index].to(device)
                if bool(rows.any()):
                    teacher = distillation.teacher[index].to(device)[rows]
                    matching = distillation_loss(logits[rows], teacher, distillation.classes.to(device))
                    loss = loss + distillation.weight * matching
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
            progress(
                (epoch * steps_per_epoch + step + 1) / total_steps,
                f"epoch {epoch + 1}/{settings.epochs}, batch {step + 1}/{steps_per_epoch}",
            )
        schedule.step()
        last_loss = float(loss_sum) / n
    optimizer.zero_grad(set_to_none=True)
    return last_loss


def infer(
    model: nn.Module, inputs: torch.Tensor, *, num_classes: int, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """Logits ``[n, num_classes]`` (float32, CPU), computed in eval mode without gradients.

    The caller's training/eval mode is restored afterwards.
    """
    if len(inputs) == 0:
        return torch.empty(0, num_classes)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            chunks = [
                model(inputs[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(inputs), batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(chunks)
