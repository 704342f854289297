"""Strategy ``uncle``: UnCLE, continual learning and data-free unlearning with a hypernetwork.

Public API: :func:`build_uncle` (the builder the registry calls), :class:`UncleStrategy`,
:class:`UnclePredictor`, :class:`UncleConfig` and the hypernetwork pieces.
"""

from __future__ import annotations

import torch

from server.engine.uncle.config import CHUNK_EMBEDDING_TRAINING, SERVING_OPTIONS, UNLEARN_METHODS, UncleConfig
from server.engine.uncle.hypernetwork import ChunkedHypernetwork, ParameterSlice, TargetLayout, auto_chunk_size
from server.engine.uncle.predictor import CacheStats, UnclePredictor
from server.engine.uncle.strategy import UncleStrategy

__all__ = [
    "CHUNK_EMBEDDING_TRAINING",
    "SERVING_OPTIONS",
    "UNLEARN_METHODS",
    "CacheStats",
    "ChunkedHypernetwork",
    "ParameterSlice",
    "TargetLayout",
    "UncleConfig",
    "UnclePredictor",
    "UncleStrategy",
    "auto_chunk_size",
    "build_uncle",
]


def build_uncle(
    *,
    backbone: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    seed: int,
    cifar_stem: bool = True,
    width: int = 0,
    beta: float = 0.001,
    gamma: float = 0.01,
    unlearn_regularization: float = 0.1,
    refit_head: bool = True,
    unlearn_update: str = "projected",
    projection_energy: float = 1e-5,
    burn_in_chunks: float = 0.5,
    projected_output_layer: bool = False,
    burn_in: int = 100,
    burn_in_decay: float = 0.9,
    burn_in_min: int = 20,
    noise_samples: int = 10,
    max_regularized_tasks: int = 32,
    regularized_networks: float = 2.0,
    relapse_guard: bool = True,
    embedding_dim: int = 32,
    chunk_embedding_dim: int = 32,
    hidden: tuple[int, ...] = (128, 256, 512),
    chunk_size: int = 0,
    chunk_embedding_training: str = "always",
    grad_clip: float = 1.0,
    unlearn_learning_rate: float = 0.0,
    lr_milestones: tuple[float, ...] = (0.6, 0.85),
    lr_gamma: float = 0.3,
    norm_scale: float = 0.1,
    target_cache_mb: float = 256.0,
    refit_unlearned_weight: float = 0.1,
    predict_cache_mb: float = 512.0,
    retain_training_data: bool = False,
) -> UncleStrategy:
    """Build the ``uncle`` strategy.

    Args:
        backbone: a name from ``backbones.BACKBONES``; the hypernetwork generates all its parameters.
        input_shape: shape of one sample, e.g. ``(1, 8, 8)``.
        num_classes: number of classes over all tasks.
        device: where the model lives and trains; data arrives on the CPU.
        seed: seeds the initialization and every random draw of every operation.
        cifar_stem: ResNets only; see ``backbones.build_backbone``.
        width: ``mlp`` hidden width or ``cnn`` base channels; 0 = the backbone's default.
        beta: weight of the output regularizer while learning.
        gamma: weight of the forgetting term while unlearning.
        unlearn_regularization: weight of the output regularizer while unlearning with the ``penalty`` update
            (paper: 1).
        refit_head: refit the output layer in closed form after each operation so other tasks keep their
            networks (skipped where one task's chunks outnumber the output layer's inputs + 1).
        unlearn_update: ``projected`` (burn-in updates confined to directions the other tasks leave free) or
            ``penalty`` (the paper: a regularizer on a sample of their chunks every step).
        projection_energy: with ``projected``, the share of the other tasks' input energy the freed directions
            may hold, per hypernetwork layer.
        burn_in_chunks: with ``projected``, the share of the forgotten task's chunks a burn-in step aligns.
        projected_output_layer: with ``projected``, also train the output layer's free directions (the refit
            re-solves it after the burn-in anyway).
        burn_in: unlearning steps of the first unlearn.
        burn_in_decay: burn-in factor after each unlearn.
        burn_in_min: lower bound of the annealed burn-in.
        noise_samples: noise draws averaged per ``noise-align`` step.
        max_regularized_tasks: the most other tasks regularized per step.
        regularized_networks: (task, chunk) pairs of those tasks regularized per step, in generated networks.
        relapse_guard: keep regularizing unlearned tasks so later learning cannot revive them.
        embedding_dim: task embedding size.
        chunk_embedding_dim: chunk embedding size.
        hidden: hypernetwork trunk widths.
        chunk_size: raw values per chunk; 0 = the size that minimizes the hypernetwork.
        chunk_embedding_training: ``always`` or ``first-task`` (the paper).
        grad_clip: maximal gradient norm per step; 0 disables clipping.
        unlearn_learning_rate: Adam learning rate of the burn-in; 0 = 0.01 (projected) or 0.001 (penalty).
        lr_milestones: fractions of a learn's steps after which the learning rate is multiplied by ``lr_gamma``.
        lr_gamma: see ``lr_milestones``.
        norm_scale: spread of generated normalization gains and shifts at init.
        target_cache_mb: memory for precomputed regularization targets of one operation.
        refit_unlearned_weight: weight of unlearned tasks' rows in the output-layer refit (learned tasks: 1).
        predict_cache_mb: memory for generated networks kept for Predict (least recently used out first); 0 =
            generate the network on every predict. Serving only: a checkpoint loads with any value.
        retain_training_data: ``learn`` returns ``Report(retain=data)`` so the server keeps each task's training
            data, and ``forget_samples`` (records-level forgetting: unlearn the task, relearn it from its retained
            data without the forgotten samples) becomes available. Off (default), UnCLE keeps no data and can
            forget only whole tasks. Not model state: a checkpoint loads with any value.

    Returns:
        A fresh strategy at version 0.

    Raises:
        ValueError: for an invalid option (all problems at once) or backbone configuration.
    """
    config = UncleConfig(
        backbone=backbone,
        input_shape=tuple(int(d) for d in input_shape),
        num_classes=int(num_classes),
        seed=int(seed),
        cifar_stem=bool(cifar_stem),
        width=int(width),
        beta=float(beta),
        gamma=float(gamma),
        unlearn_regularization=float(unlearn_regularization),
        refit_head=bool(refit_head),
        unlearn_update=str(unlearn_update),
        projection_energy=float(projection_energy),
        burn_in_chunks=float(burn_in_chunks),
        projected_output_layer=bool(projected_output_layer),
        burn_in=int(burn_in),
        burn_in_decay=float(burn_in_decay),
        burn_in_min=int(burn_in_min),
        noise_samples=int(noise_samples),
        max_regularized_tasks=int(max_regularized_tasks),
        regularized_networks=float(regularized_networks),
        relapse_guard=bool(relapse_guard),
        embedding_dim=int(embedding_dim),
        chunk_embedding_dim=int(chunk_embedding_dim),
        hidden=tuple(int(w) for w in hidden),
        chunk_size=int(chunk_size),
        chunk_embedding_training=str(chunk_embedding_training),
        grad_clip=float(grad_clip),
        unlearn_learning_rate=float(unlearn_learning_rate),
        lr_milestones=tuple(float(m) for m in lr_milestones),
        lr_gamma=float(lr_gamma),
        norm_scale=float(norm_scale),
        target_cache_mb=float(target_cache_mb),
        refit_unlearned_weight=float(refit_unlearned_weight),
        predict_cache_mb=float(predict_cache_mb),
        retain_training_data=bool(retain_training_data),
    )
    return UncleStrategy(config, torch.device(device))
