"""Strategy ``agscl``: AGS-CL, node-importance based adaptive group sparse regularization.

AGS-CL (see ``shared/seeds/ags-cl-adaptive-group-sparsity.md``), task-incremental with one head per
task:

* **Learn** task t (Algorithm 1): Adam on the task's cross-entropy; after every epoch the
  closed-form proximal step of equation (7) on every node's incoming group: the group lasso
  ``(1 − αμ/‖θ‖)₊ θ`` on unimportant nodes (Ω = 0, term (a): exact zeros, so they stay free for
  later tasks) and the pull ``γθ + (1 − γ)θ̂`` toward the weights after the previous task on
  important ones (term (b), ``γ = (1 − αλΩ/‖θ − θ̂‖)₊``: exact freezing). α is the learning rate.
  Weights from unimportant nodes into important ones are held at zero throughout (I.1, "for all
  future tasks").
* **After the task**: ``Ω ← ηΩ + mean ReLU activation`` per node over the task's training data
  (equation 8; conv nodes are channels, averaged over positions); then (I.1) the outgoing weights
  of the nodes still at Ω = 0 are zeroed, in the consumer layers and in every head, and (I.2) the
  incoming weights of each such node are re-initialized with probability ρ.

Beyond the paper:

* **Per-task BatchNorm statistics** (``cnn``, ResNets): each task keeps the running statistics of
  its own data; frozen nodes then compute for an old task exactly what they did.
* **Unlearning** (data-free, method ``release``): Ω is kept as the sum of per-task shares
  (``Ω = Σ_t η^(T−t) a_t``, the same number); the nodes of which the forgotten task holds at least
  ``release_share`` of Ω are released (incoming weights re-initialized, outgoing weights zeroed,
  every share of them dropped: they are free again), the task's share of every other node is
  dropped, and its head is deleted. Method ``amnesia`` (Selective Amnesia, seed on CL and
  unlearning): the forgotten task is trained toward a noise surrogate (random labels over its classes),
  with an EWC penalty (diagonal Fisher of the retained tasks) and replay of their retained data;
  needs ``retain_training_data``.
* **Capacity** (seed on dynamic model size): before a new task, when a resizable node layer has
  fewer than ``min_free_fraction`` of its units free, every resizable node layer grows by ``grow_percent``
  (every layer of ``mlp`` and ``cnn``; the inner convs of each ResNet block, whose residual-stream
  widths stay fixed, see :mod:`server.engine.agscl.capacity`);
  after an unlearn, free units beyond a reserve of ``grow_percent`` are pruned (never below the
  configured width). Neither changes any prediction (see :mod:`server.engine.agscl.capacity`). The
  layers also grow during a learn when the loss stays above ``grow_loss``
  (:mod:`server.engine.agscl.growth`), and targeted dropout of the weakest free units keeps a share
  of them free after every task (:mod:`server.engine.agscl.dropout`).
* **Temporary learning** (CLPU, :class:`~server.engine.protocol.TemporaryLearning`): a TEMPORARY task
  gets a side network of its own (:mod:`server.engine.temporary`; the main model, Ω and capacity are
  not touched); committing it is one AGS-CL learn with logit matching to the side network added to
  the loss, then the side network is deleted.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn
from torch.func import functional_call

from server.engine.agscl import capacity
from server.engine.agscl.config import RESIZABLE_BACKBONES, UNLEARN_METHODS, AgsclConfig
from server.engine.agscl.dropout import TargetedDropout, weakest_free
from server.engine.agscl.growth import LossTrigger, extend_adam
from server.engine.agscl.nodes import (
    ActivationMeter,
    NodeLayer,
    apply_masks,
    fixed_zero_masks,
    group_matrix,
    node_layers,
    proximal_step,
    reinitialize_incoming,
    silent_nodes,
    width_of,
    zero_outgoing,
)
from server.engine.agscl.predictor import AgsclPredictor
from server.engine.backbones import build_backbone, detach_head
from server.engine.protocol import LearnOptions, Progress, Report, TaskData, UnknownTaskError, UnlearnedTaskError
from server.engine.temporary import (
    DISTILL_WEIGHT,
    SideNetwork,
    SideNetworks,
    TaskSidePredictor,
    distillation_loss,
    fit_side_network,
)
from server.engine.training import (
    check_learn_inputs,
    class_mask,
    count_minibatches,
    derive_seed,
    linear_from_state,
    mask_logits,
    minibatches,
    module_state_cpu,
    seeded_generator,
    seeded_rng,
)

_STATE_FORMAT = "lethe.agscl/1"
#: Samples per forward pass when measuring activations.
_MEASURE_BATCH = 256

Shares = dict[str, dict[str, torch.Tensor]]  # task -> layer name -> its share of Ω [nodes] (CPU float32)


class AgsclStrategy:
    """AGS-CL: a shared trunk whose nodes are sparsified, frozen and re-initialized by importance; one head per task.

    Built by :func:`server.engine.agscl.build_agscl`. The worker thread is the only caller of every
    method except the predictors it hands out. Every operation works on copies and commits them
    only when it has finished, so an exception (``progress`` raising, to cancel) changes nothing.

    Args:
        config: validated configuration.
        device: where the model lives and trains; data arrives on the CPU.
    """

    name: str = "agscl"
    task_incremental: bool = True
    needs_replay: bool = False
    unlearn_methods: tuple[str, ...] = UNLEARN_METHODS
    #: The paper's Adam; 20 epochs of batch 32 learn a digits task to its ceiling.
    learn_defaults: LearnOptions = LearnOptions(epochs=20, batch_size=32, learning_rate=1e-3, holdout_fraction=0.1)

    def __init__(self, config: AgsclConfig, device: torch.device) -> None:
        self.config = config
        self.version = 0
        #: With ``retain_training_data`` the server keeps each task's data and hands it back as replay, which
        #: unlearn method ``amnesia`` trains on (learning ignores it).
        self.needs_replay = config.retain_training_data
        self._device = torch.device(device)
        with seeded_rng(derive_seed(config.seed, "init")):
            model = build_backbone(
                config.backbone,
                config.input_shape,
                config.num_classes,
                cifar_stem=config.cifar_stem,
                width=config.width,
            )
        self._template: nn.Linear = detach_head(model).to(self._device)
        self._trunk: nn.Module = model.to(self._device)
        self._layers: tuple[NodeLayer, ...] = node_layers(self._trunk, config.backbone)
        self._initial_widths = {layer.name: width_of(self._trunk, layer) for layer in self._layers}
        self._buffer_names = frozenset(name for name, _ in self._trunk.named_buffers())
        self._heads: dict[str, nn.Linear] = {}  # live tasks, in learning order
        self._audit_heads: dict[str, nn.Linear] = {}  # unlearned with amnesia: the head it trained
        self._classes: dict[str, tuple[int, ...]] = {}  # every task ever learned
        self._unlearned: set[str] = set()
        self._stats: dict[str, dict[str, torch.Tensor]] = {}  # task -> its BatchNorm running statistics
        self._shares: Shares = {}  # live task -> its share of Ω
        self._grown_units = 0
        self._pruned_units = 0
        self._predictor: AgsclPredictor | TaskSidePredictor | None = None
        #: TEMPORARY tasks: isolated side networks of the configured backbone (never the main model).
        self._sides = SideNetworks(self._fresh_backbone, config.num_classes, self._device)
        #: Temporary tasks whose side network was deleted (the main model never held them).
        self._forgotten_temporary: set[str] = set()

    def _fresh_backbone(self, seed: int) -> nn.Module:
        """The configured backbone (configured width, head included) initialized from ``seed``, on the CPU."""
        cfg = self.config
        with seeded_rng(seed):
            return build_backbone(
                cfg.backbone, cfg.input_shape, cfg.num_classes, cifar_stem=cfg.cifar_stem, width=cfg.width
            )

    # ------------------------------------------------------------------ importance

    def _omega(self, shares: Shares, widths: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
        """Ω per layer: the sum of the live tasks' shares (zeros where there are none)."""
        widths = widths or {layer.name: width_of(self._trunk, layer) for layer in self._layers}
        omega = {name: torch.zeros(width) for name, width in widths.items()}
        for per_layer in shares.values():
            for name, share in per_layer.items():
                omega[name] = omega[name] + share
        return omega

    def _free_units(self, omega: Mapping[str, torch.Tensor]) -> int:
        return sum(int((value == 0).sum()) for value in omega.values())

    # ------------------------------------------------------------------ learning

    def learn(
        self,
        task: str,
        data: TaskData,
        options: LearnOptions,
        progress: Progress,
        replay: Mapping[str, TaskData],
    ) -> Report:
        """Learn ``task`` from ``data`` (Algorithm 1, one task).

        A new task (or a previously unlearned one) gets a fresh copy of the initial head; a live task
        continues with its head, its statistics and the union of its classes.

        Args:
            task: task name.
            data: CPU samples; inputs ``[n, *input_shape]``, labels ``[n]``.
            options: epochs, batch size, learning rate (Adam's, and α of the proximal step) and seed.
            progress: called after every batch.
            replay: ignored (AGS-CL needs no data of other tasks).

        Returns:
            Metrics ``train_loss``, ``train_accuracy`` (last epoch, percent), ``zero_groups`` and
            ``frozen_groups`` (nodes exactly sparsified / frozen by the last proximal step),
            ``important_units``, ``free_units``, ``reinitialized_units``, ``grown_units`` (this
            learn, before it and during it), ``loss_growths`` (growths during it, on the loss),
            ``targeted_units`` (pruned from the task after targeted dropout, left free),
            ``pruned_units`` (0), ``parameters``, ``learn_seconds`` and ``samples``; with
            ``retain_training_data``, ``retain`` is ``data`` itself.

        Raises:
            ValueError: if the data or options do not fit the model, or ``task`` is a temporary task.
        """
        if task in self._sides:
            raise ValueError(f"task {task!r} is a temporary task: commit it or unlearn it")
        return self._learn(task, data, options, progress, None)

    def _learn(
        self, task: str, data: TaskData, options: LearnOptions, progress: Progress, teacher: torch.Tensor | None
    ) -> Report:
        """:meth:`learn`, with ``teacher`` logits ``[n, num_classes]`` (on the device) to match, for a commit, or None.

        With ``teacher`` the loss of every batch adds ``DISTILL_WEIGHT`` times the logit matching of
        :func:`~server.engine.temporary.distillation_loss` over the task's classes; everything else
        (proximal step, Ω update, re-initializations, capacity growth) is as for a plain learn, and
        the commit also deletes the task's side network.
        """
        cfg = self.config
        check_learn_inputs(data, options, cfg.input_shape, cfg.num_classes)
        started = time.perf_counter()
        live = task in self._heads
        classes = tuple(sorted(set(data.labels.tolist()) | set(self._classes[task] if live else ())))
        mask = class_mask(classes, cfg.num_classes, self._device)
        indices_of_classes = torch.tensor(classes, dtype=torch.long, device=self._device)

        trunk = copy.deepcopy(self._trunk)
        heads = {name: copy.deepcopy(head) for name, head in self._heads.items()}
        audit_heads = dict(self._audit_heads)
        template = copy.deepcopy(self._template)
        shares = {t: {k: v.clone() for k, v in per.items()} for t, per in self._shares.items()}
        all_stats = dict(self._stats)
        grown = 0
        if cfg.resizable and not live:
            grown, template = self._maybe_grow(trunk, heads, audit_heads, template, shares, all_stats)
        head = heads[task] if live else copy.deepcopy(template)
        heads[task] = head
        buffers = all_stats[task] if live else _fresh_buffers(trunk)
        with torch.no_grad():
            for name, buffer in trunk.named_buffers():
                buffer.copy_(buffers[name])

        omega = self._omega(shares, self._widths(trunk))
        anchor = {layer.name: group_matrix(trunk, layer) for layer in self._layers}
        masks = fixed_zero_masks(trunk, self._layers, omega)
        apply_masks(trunk, masks)
        optimizer = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=options.learning_rate)
        generator = seeded_generator(cfg.seed, options.seed, self.version, task, "learn")
        trigger = LossTrigger(cfg.grow_loss if cfg.resizable else 0.0, cfg.grow_patience)
        # The weights at the start, grown alongside the trunk, give the proximal step its θ̂ after a growth.
        start = copy.deepcopy(trunk) if trigger.threshold > 0 else None
        targeted = cfg.dropout_percent > 0 and cfg.dropout_rate > 0
        dropout = TargetedDropout(
            trunk,
            self._layers,
            cfg.dropout_rate if targeted else 0.0,
            seeded_generator(cfg.seed, options.seed, self.version, task, "targeted-dropout"),
        )
        n = len(data)
        batches_per_epoch = count_minibatches(n, options.batch_size)
        total_steps = options.epochs * batches_per_epoch
        trunk.train()
        step = 0
        loss_growths = 0
        prox: dict[str, int] = {"zero_groups": 0, "frozen_groups": 0}
        loss_sum = torch.zeros((), device=self._device)
        correct = torch.zeros((), dtype=torch.long, device=self._device)
        with dropout:
            for epoch in range(options.epochs):
                if targeted:
                    dropout.target(weakest_free(trunk, self._layers, omega, cfg.dropout_percent))
                loss_sum.zero_()
                correct.zero_()
                for batch, indices in enumerate(minibatches(n, options.batch_size, generator)):
                    x = data.inputs[indices].to(self._device, torch.float32)  # [b, *input_shape]
                    y = data.labels[indices].to(self._device)  # [b]
                    logits = mask_logits(head(trunk(x)), mask)  # [b, num_classes]
                    loss = F.cross_entropy(logits, y)
                    if teacher is not None:
                        loss = loss + DISTILL_WEIGHT * distillation_loss(
                            logits, teacher[indices.to(self._device)], indices_of_classes
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    apply_masks(trunk, masks)
                    if not cfg.prox_every_epoch:
                        prox = self._prox(trunk, omega, anchor, options.learning_rate)
                    with torch.no_grad():
                        loss_sum += loss.detach() * y.numel()
                        correct += (logits.argmax(dim=1) == y).sum()
                    step += 1
                    progress(
                        step / total_steps,
                        f"epoch {epoch + 1}/{options.epochs}, batch {batch + 1}/{batches_per_epoch}",
                    )
                if cfg.prox_every_epoch:
                    prox = self._prox(trunk, omega, anchor, options.learning_rate)
                if start is not None and trigger.update(float(loss_sum) / n, epochs_left=options.epochs - epoch - 1):
                    # The loss stayed above τ: grow now and train on (the seed's DEN trigger).
                    before = [*trunk.parameters(), *head.parameters()]
                    extra = self._extra(trunk)
                    if any(extra.values()):
                        seed = derive_seed(cfg.seed, self.version, "grow", "loss", epoch)
                        template = self._grow(
                            trunk, heads, audit_heads, template, shares, all_stats, extra, omega, seed
                        )
                        # The same new weights in θ̂ (those into important nodes zero, like the trunk's).
                        self._grow(start, {}, {}, template, {}, {}, extra, omega, seed)
                        head = heads[task]
                        omega = self._omega(shares, self._widths(trunk))
                        anchor = {layer.name: group_matrix(start, layer) for layer in self._layers}
                        masks = fixed_zero_masks(trunk, self._layers, omega)
                        optimizer = extend_adam(optimizer, before, [*trunk.parameters(), *head.parameters()])
                        dropout.attach(trunk)
                        grown += sum(extra.values())
                        loss_growths += 1

        # Targeted dropout's pruning: the weakest free units leave the task (outgoing weights zeroed, no Ω share).
        trunk.eval()
        targeted_nodes = {layer.name: torch.zeros_like(omega[layer.name], dtype=torch.bool) for layer in self._layers}
        if targeted:
            targeted_nodes = weakest_free(trunk, self._layers, omega, cfg.dropout_percent)
            zero_outgoing(trunk, self._layers, targeted_nodes, list(heads.values()))

        # Ω update (equation 8), then the re-initializations (I.1 then I.2).
        stats = {name: b.detach().clone() for name, b in trunk.named_buffers()}
        activations = self._activations(trunk, data.inputs)
        activations = {name: a.masked_fill(targeted_nodes[name], 0.0) for name, a in activations.items()}
        for per_layer in shares.values():
            for name in per_layer:
                per_layer[name] = per_layer[name] * cfg.eta
        previous = shares.get(task, {})
        shares[task] = {name: previous.get(name, torch.zeros_like(a)) + a for name, a in activations.items()}
        omega = self._omega(shares, self._widths(trunk))
        free = {name: value == 0 for name, value in omega.items()}
        zero_outgoing(trunk, self._layers, free, list(heads.values()))
        reinit_generator = seeded_generator(cfg.seed, self.version, "reinitialize")
        reinitialized = 0
        for layer in self._layers:
            if not layer.reinit:
                continue
            draw = torch.rand(free[layer.name].shape, generator=reinit_generator) < cfg.rho
            chosen = free[layer.name] & draw
            reinitialize_incoming(trunk, layer, chosen.to(self._device), reinit_generator)
            reinitialized += int(chosen.sum())

        # Commit: nothing above touched the strategy's own state.
        if teacher is not None:
            self._sides.replace(self._sides.without(task))
        self._forgotten_temporary.discard(task)
        self._trunk = trunk.requires_grad_(True)
        self._template = template
        self._heads = heads
        self._audit_heads = audit_heads
        self._audit_heads.pop(task, None)
        self._classes[task] = classes
        self._unlearned.discard(task)
        all_stats[task] = stats
        self._stats = all_stats
        self._shares = shares
        self._grown_units += grown
        self.version += 1
        self._predictor = None
        return Report(
            metrics={
                "train_loss": float(loss_sum) / n,
                "train_accuracy": 100.0 * float(correct) / n,
                "zero_groups": float(prox["zero_groups"]),
                "frozen_groups": float(prox["frozen_groups"]),
                "important_units": float(sum(int((v > 0).sum()) for v in omega.values())),
                "free_units": float(self._free_units(omega)),
                "reinitialized_units": float(reinitialized),
                "grown_units": float(grown),
                "loss_growths": float(loss_growths),
                "targeted_units": float(sum(int(nodes.sum()) for nodes in targeted_nodes.values())),
                "pruned_units": 0.0,
                "parameters": float(self.parameter_count()),
                "learn_seconds": time.perf_counter() - started,
                "samples": float(n),
            },
            retain=data if cfg.retain_training_data else None,
        )

    def _prox(
        self, trunk: nn.Module, omega: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], alpha: float
    ) -> dict[str, int]:
        return proximal_step(trunk, self._layers, omega, anchor, alpha=alpha, mu=self.config.mu, lamb=self.config.lamb)

    @torch.no_grad()
    def _activations(self, trunk: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean ReLU activation per node of ``trunk`` (eval mode) over ``inputs``."""
        meter = ActivationMeter(trunk, self._layers)
        try:
            for part in torch.split(inputs, _MEASURE_BATCH):
                trunk(part.to(self._device, torch.float32))
                meter.add_samples(part.shape[0])
        finally:
            meter.close()
        return meter.means()

    def _widths(self, trunk: nn.Module) -> dict[str, int]:
        return {layer.name: width_of(trunk, layer) for layer in self._layers}

    def _maybe_grow(
        self,
        trunk: nn.Module,
        heads: dict[str, nn.Linear],
        audit_heads: dict[str, nn.Linear],
        template: nn.Linear,
        shares: Shares,
        stats: dict[str, dict[str, torch.Tensor]],
    ) -> tuple[int, nn.Linear]:
        """Grow every resizable layer by ``grow_percent`` when one has too few free units (in place on copies).

        Returns:
            Units added, and the (grown) template head. ``heads``, ``audit_heads``, ``shares`` and the
            tasks' BatchNorm ``stats`` are updated in place.
        """
        cfg = self.config
        widths = self._widths(trunk)
        omega = self._omega(shares, widths)
        short = any(
            int((omega[layer.name] == 0).sum()) < cfg.min_free_fraction * widths[layer.name]
            for layer in self._layers
            if layer.resizable
        )
        extra = self._extra(trunk)
        if not short or not any(extra.values()):
            return 0, template
        seed = derive_seed(cfg.seed, self.version, "grow")
        template = self._grow(trunk, heads, audit_heads, template, shares, stats, extra, omega, seed)
        return sum(extra.values()), template

    def _extra(self, trunk: nn.Module) -> dict[str, int]:
        """Units each node layer gets in a growth: ``grow_percent`` of its width, up to ``max_width_factor``.

        None for a layer that is not resizable (a ResNet's residual stream).
        """
        extra = {}
        for layer in self._layers:
            width = width_of(trunk, layer)
            room = self._max_width(layer.name) - width if layer.resizable else 0
            extra[layer.name] = max(0, min(math.ceil(width * self.config.grow_percent / 100), room))
        return extra

    def _grow(
        self,
        trunk: nn.Module,
        heads: dict[str, nn.Linear],
        audit_heads: dict[str, nn.Linear],
        template: nn.Linear,
        shares: Shares,
        stats: dict[str, dict[str, torch.Tensor]],
        extra: Mapping[str, int],
        omega: Mapping[str, torch.Tensor],
        seed: int,
    ) -> nn.Linear:
        """Add ``extra`` units per node layer (in place on copies); return the grown template.

        ``omega`` (Ω before the growth) decides which weights from new units are zero (into important
        nodes); the new weights are drawn from a generator seeded with ``seed``; ``heads``,
        ``audit_heads``, ``shares`` and the tasks' BatchNorm ``stats`` are grown in place.
        """
        names, audit_names = list(heads), list(audit_heads)
        grown = capacity.grow(
            trunk,
            self._layers,
            extra,
            [*(heads[n] for n in names), *(audit_heads[n] for n in audit_names)],
            template,
            omega,
            torch.Generator().manual_seed(seed),
        )
        for name, head in zip(names + audit_names, grown, strict=False):
            (heads if name in heads else audit_heads)[name] = head
        for per_layer in shares.values():
            for name, added in extra.items():
                per_layer[name] = torch.cat([per_layer[name], torch.zeros(added)])
        for task, buffers in stats.items():
            stats[task] = capacity.resize_statistics(buffers, self._layers, {}, extra)
        return grown[-1]

    def _max_width(self, name: str) -> int:
        return math.floor(self._initial_widths[name] * self.config.max_width_factor)

    # ---------------------------------------------------------------- unlearning

    def unlearn(self, task: str, method: str, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        """Forget ``task``.

        Methods:

        * ``release`` (default, data-free): release the nodes whose importance the task dominates
          (re-initialize their incoming weights, zero their outgoing weights, drop every share of
          them), drop its share of every other node, delete its head; then, with capacity, prune
          the free units beyond the reserve.
        * ``amnesia``: train the task toward random labels over its classes (the noise surrogate) with an EWC
          penalty (diagonal Fisher of the retained tasks) and replay of their retained data; its
          share of Ω is dropped, and the head it trained is kept for audits only (Predict with
          ``allow_unlearned``). Needs the task's training data in ``replay``
          (``retain_training_data``).

        Args:
            task: a learned task.
            method: one of :attr:`unlearn_methods`, or ``""`` for the default.
            progress: reports the work done; may raise to cancel.
            replay: retained data of the live tasks (``amnesia`` only).

        Returns:
            Metrics ``unlearn_seconds``, ``released_units``, ``free_units``, ``pruned_units``,
            ``grown_units`` (0), ``parameters``; ``amnesia`` adds ``forget_loss``, ``replay_loss``,
            ``ewc_loss`` (last epoch means).

        Raises:
            ValueError: for an unknown method, or ``amnesia`` without the task's retained data.
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if it is already unlearned.
        """
        method = method or self.unlearn_methods[0]
        if method not in self.unlearn_methods:
            raise ValueError(
                f"unknown unlearn method {method!r} for strategy 'agscl'; allowed: {', '.join(self.unlearn_methods)}"
            )
        if task in self._unlearned:
            raise UnlearnedTaskError(f"task {task!r} is already unlearned")
        if task not in self._heads:
            raise UnknownTaskError(f"task {task!r} was never learned")
        if method == "amnesia" and task not in replay:
            raise ValueError(
                f"unlearn method 'amnesia' needs the training data of task {task!r}, which the server keeps only "
                "with training.retain_training_data = true (set before the task was learned); "
                "use method 'release' (data-free) instead"
            )
        started = time.perf_counter()
        progress(0.0, f"unlearning with {method}")
        trunk = copy.deepcopy(self._trunk)
        heads = {name: copy.deepcopy(head) for name, head in self._heads.items() if name != task}
        audit_heads = dict(self._audit_heads)
        shares = {t: {k: v.clone() for k, v in per.items()} for t, per in self._shares.items()}
        stats = dict(self._stats)
        if method == "release":
            stats.pop(task, None)
        template = self._template
        metrics: dict[str, float] = {}
        released = 0
        if method == "release":
            released = self._release(trunk, heads, shares, task)
        else:
            audit_head, losses = self._amnesia(trunk, task, replay, progress)
            audit_heads[task] = audit_head
            metrics.update(losses)
        del shares[task]
        pruned = 0
        if self.config.resizable and self.config.prune:
            pruned, template = self._prune(trunk, heads, audit_heads, template, shares, stats)
        progress(1.0, f"unlearned with {method}")

        # Commit.
        self._trunk = trunk
        self._heads = heads
        self._audit_heads = audit_heads
        self._template = template
        self._shares = shares
        self._stats = stats
        self._unlearned.add(task)
        self._pruned_units += pruned
        self.version += 1
        self._predictor = None
        omega = self._omega(shares)
        metrics.update(
            {
                "released_units": float(released),
                "free_units": float(self._free_units(omega)),
                "grown_units": 0.0,
                "pruned_units": float(pruned),
                "parameters": float(self.parameter_count()),
                "unlearn_seconds": time.perf_counter() - started,
            }
        )
        return Report(metrics=metrics)

    def _release(self, trunk: nn.Module, heads: dict[str, nn.Linear], shares: Shares, task: str) -> int:
        """Release the nodes ``task`` dominates (in place on copies); return how many."""
        omega = self._omega(shares, self._widths(trunk))
        dominated = {
            name: (omega[name] > 0) & (shares[task][name] >= self.config.release_share * omega[name]) for name in omega
        }
        for per_layer in shares.values():
            for name, nodes in dominated.items():
                per_layer[name] = per_layer[name].masked_fill(nodes, 0.0)
        zero_outgoing(trunk, self._layers, dominated, list(heads.values()))
        generator = seeded_generator(self.config.seed, self.version, "release")
        for layer in self._layers:
            if layer.reinit:
                reinitialize_incoming(trunk, layer, dominated[layer.name].to(self._device), generator)
        return sum(int(nodes.sum()) for nodes in dominated.values())

    def _forward(self, trunk: nn.Module, task: str, x: torch.Tensor) -> torch.Tensor:
        """Features of ``x`` through ``trunk`` with ``task``'s BatchNorm statistics (eval mode)."""
        stats = self._stats.get(task)
        if stats:
            return functional_call(trunk, stats, (x,))
        return trunk(x)

    def _amnesia(
        self, trunk: nn.Module, task: str, replay: Mapping[str, TaskData], progress: Progress
    ) -> tuple[nn.Linear, dict[str, float]]:
        """Selective Amnesia on ``trunk`` (in place) and a copy of ``task``'s head; return the head and losses."""
        cfg = self.config
        head = copy.deepcopy(self._heads[task])
        forget = replay[task]
        retained = [name for name in self._heads if name != task and name in replay]
        trunk.eval()  # BatchNorm: every task's own statistics, never updated here
        parameters = [p for p in trunk.parameters()]
        anchor = [p.detach().clone() for p in parameters]
        fisher = self._fisher(trunk, parameters, retained, replay)
        generator = seeded_generator(cfg.seed, self.version, task, "amnesia")
        optimizer = torch.optim.Adam([*parameters, *head.parameters()], lr=cfg.amnesia_learning_rate)
        mask = class_mask(self._classes[task], cfg.num_classes, self._device)
        seen = mask.nonzero().flatten()
        n = len(forget)
        batch_size = self.learn_defaults.batch_size
        total = cfg.amnesia_epochs * count_minibatches(n, batch_size)
        step = 0
        sums = {"forget_loss": 0.0, "replay_loss": 0.0, "ewc_loss": 0.0}
        # The surrogate: a label drawn uniformly from the task's classes for every sample, once. Its optimum is a
        # head whose answers on the task carry no information about the true class; training toward the uniform
        # distribution alone left near-ties whose argmax still followed the true class (70 % balanced accuracy on
        # the probe of a two-class task).
        surrogate = seen.cpu()[torch.randint(seen.numel(), (n,), generator=generator)]
        for _epoch in range(cfg.amnesia_epochs):
            sums = dict.fromkeys(sums, 0.0)
            batches = minibatches(n, batch_size, generator)
            for indices in batches:
                x = forget.inputs[indices].to(self._device, torch.float32)
                logits = mask_logits(head(self._forward(trunk, task, x)), mask)
                forget_loss = F.cross_entropy(logits, surrogate[indices].to(self._device))
                replay_loss = torch.zeros((), device=self._device)
                if retained:
                    other = retained[step % len(retained)]
                    data = replay[other]
                    pick = torch.randint(len(data), (batch_size,), generator=generator)
                    rx = data.inputs[pick].to(self._device, torch.float32)
                    ry = data.labels[pick].to(self._device)
                    other_mask = class_mask(self._classes[other], cfg.num_classes, self._device)
                    other_logits = mask_logits(self._heads[other](self._forward(trunk, other, rx)), other_mask)
                    replay_loss = F.cross_entropy(other_logits, ry)
                ewc = sum(
                    ((f * (p - a).square()).sum() for f, p, a in zip(fisher, parameters, anchor, strict=True)),
                    torch.zeros((), device=self._device),
                )
                loss = forget_loss + cfg.amnesia_replay * replay_loss + cfg.amnesia_ewc * ewc
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums["forget_loss"] += float(forget_loss.detach()) / len(batches)
                sums["replay_loss"] += float(replay_loss.detach()) / len(batches)
                sums["ewc_loss"] += float(ewc.detach()) / len(batches)
                step += 1
                progress(0.95 * step / total, f"amnesia step {step}/{total}")
        for other in self._heads:  # replay trained through them; they were never in the optimizer
            self._heads[other].zero_grad(set_to_none=True)
        trunk.zero_grad(set_to_none=True)
        return head.requires_grad_(False), sums

    def _fisher(
        self, trunk: nn.Module, parameters: list[nn.Parameter], tasks: list[str], replay: Mapping[str, TaskData]
    ) -> list[torch.Tensor]:
        """Diagonal empirical Fisher of the trunk's parameters over the retained tasks' data.

        The mean of squared batch gradients of the cross-entropy with the true labels.
        """
        fisher = [torch.zeros_like(p) for p in parameters]
        batches = 0
        for task in tasks:
            data = replay[task]
            mask = class_mask(self._classes[task], self.config.num_classes, self._device)
            head = copy.deepcopy(self._heads[task])
            for part in torch.split(torch.arange(len(data)), self.learn_defaults.batch_size):
                x = data.inputs[part].to(self._device, torch.float32)
                y = data.labels[part].to(self._device)
                loss = F.cross_entropy(mask_logits(head(self._forward(trunk, task, x)), mask), y)
                gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
                for total, gradient in zip(fisher, gradients, strict=True):
                    if gradient is not None:
                        total += gradient.detach().square()
                batches += 1
        return [total / max(batches, 1) for total in fisher]

    def _prune(
        self,
        trunk: nn.Module,
        heads: dict[str, nn.Linear],
        audit_heads: dict[str, nn.Linear],
        template: nn.Linear,
        shares: Shares,
        stats: dict[str, dict[str, torch.Tensor]],
    ) -> tuple[int, nn.Linear]:
        """Prune free units beyond a reserve of ``grow_percent`` per layer, never below the configured width.

        Only free units that are silent (no outgoing weight into the trunk or a live task's head) go, so
        pruning changes no prediction: after ``release`` every free unit is silent, while units that
        ``amnesia`` frees keep the weights it trained and stay.

        In place on the copies ``trunk``, ``heads``, ``audit_heads``, ``shares`` and ``stats``; returns
        the number of units pruned and the pruned template.
        """
        widths = self._widths(trunk)
        omega = self._omega(shares, widths)
        silent = silent_nodes(trunk, self._layers, list(heads.values()))
        keep: dict[str, torch.Tensor] = {}
        pruned = 0
        for layer in self._layers:
            name, width = layer.name, widths[layer.name]
            free = ((omega[name] == 0) & silent[name]).nonzero().flatten()
            reserve = max(1, math.ceil(width * self.config.grow_percent / 100))
            removable = min(free.numel() - reserve, width - self._initial_widths[name]) if layer.resizable else 0
            removed = free[free.numel() - removable :] if removable > 0 else free[:0]
            kept = torch.ones(width, dtype=torch.bool)
            kept[removed] = False
            keep[name] = kept.nonzero().flatten()
            pruned += int(removed.numel())
        if pruned == 0:
            return 0, template
        names, audit_names = list(heads), list(audit_heads)
        result = capacity.prune(
            trunk,
            self._layers,
            keep,
            [*(heads[n] for n in names), *(audit_heads[n] for n in audit_names), template],
        )
        for name, head in zip(names + audit_names, result, strict=False):
            (heads if name in heads else audit_heads)[name] = head
        for per_layer in shares.values():
            for name, kept_index in keep.items():
                per_layer[name] = per_layer[name][kept_index]
        for task, buffers in stats.items():
            stats[task] = capacity.resize_statistics(buffers, self._layers, keep, {})
        return pruned, result[-1]

    def forget_more(self, task: str, attempt: int, progress: Progress, *, final: bool = False) -> Report | None:
        """Forget an unlearned ``task`` harder: drop the head ``amnesia`` kept for audits.

        Afterwards the model holds no parameter of the task and answers it with equal logits.
        Returns None (nothing stronger) for a task unlearned with ``release``.
        """
        if task not in self._unlearned:
            raise UnlearnedTaskError(f"task {task!r} is not an unlearned task")
        if task not in self._audit_heads:
            return None
        started = time.perf_counter()
        audit_heads = {name: head for name, head in self._audit_heads.items() if name != task}
        progress(1.0, "dropped the amnesia head")
        self._audit_heads = audit_heads
        self._stats.pop(task, None)
        self.version += 1
        self._predictor = None
        return Report(metrics={"forget_more_attempt": float(attempt), "unlearn_seconds": time.perf_counter() - started})

    def sample_forgetting(self) -> str | None:
        """Why :meth:`forget_samples` cannot run: AGS-CL forgets whole tasks only."""
        return (
            "strategy 'agscl' forgets whole tasks only (its node importances and frozen weights mix every sample "
            "of a task): unlearn the whole task, or use strategy 'lure' or 'finetune' with "
            "training.retain_training_data = true for records-level forgetting"
        )

    # ------------------------------------------------------------ temporary learning

    def learn_temporary(self, task: str, data: TaskData, options: LearnOptions, progress: Progress) -> Report:
        """Train a side network for ``task``: a fresh backbone on ``data`` only (the main model is not touched).

        The configured backbone at its configured width (capacity growth is the main model's, not
        the side network's), initialized from (seed, ``task``, ``options.seed``) and trained with
        Adam and masked cross-entropy, without AGS-CL's regularization (it holds one task, so there
        is nothing to protect). The trunk, its Ω shares, the heads, the BatchNorm statistics and the
        capacity counters stay bit for bit as they were. Returns its metrics, ``learn_seconds`` and
        ``retain=data``.

        Raises:
            ValueError: ``task`` is live or already temporary, or bad data or options.
        """
        cfg = self.config
        check_learn_inputs(data, options, cfg.input_shape, cfg.num_classes)
        if task in self._heads or task in self._sides:
            raise ValueError(f"task {task!r} is already learned")
        started = time.perf_counter()
        classes = tuple(sorted(set(data.labels.tolist())))
        network = self._sides.fresh(derive_seed(cfg.seed, "side-network", task, options.seed))
        generator = seeded_generator(cfg.seed, options.seed, task, "side-network")
        mask = class_mask(classes, cfg.num_classes, self._device)
        metrics = fit_side_network(network, data, options, mask, generator, progress, self._device)
        # Commit: only the side networks change.
        self._sides.replace(self._sides.with_added(SideNetwork(task, network, classes, options)))
        self._forgotten_temporary.discard(task)
        self.version += 1
        self._predictor = None
        metrics["learn_seconds"] = time.perf_counter() - started
        return Report(metrics=metrics, retain=data)

    def forget_temporary(self, task: str, progress: Progress) -> Report:
        """Delete ``task``'s side network: exact forgetting, the main model is not touched.

        Returns ``unlearn_seconds``.

        Raises:
            UnknownTaskError: ``task`` has no side network.
        """

        def committed() -> None:
            self._forgotten_temporary.add(task)
            self.version += 1
            self._predictor = None

        return self._sides.delete(task, progress, committed)

    def commit_temporary(self, task: str, data: TaskData, progress: Progress, replay: Mapping[str, TaskData]) -> Report:
        """Learn ``task`` into the main model from ``data`` as :meth:`learn` does, matching its side network's logits.

        One AGS-CL learn (proximal steps, Ω update, re-initializations, capacity growth) with the
        options the side network was trained with, whose loss adds ``DISTILL_WEIGHT`` times the
        logit matching to the side network on the same samples; then the side network is deleted.
        Metrics are :meth:`learn`'s plus ``distill_weight``.

        Raises:
            UnknownTaskError: ``task`` has no side network.
        """
        side = self._sides.get(task)
        teacher = self._sides.logits(task, data.inputs)  # [n, num_classes], -inf outside its classes
        report = self._learn(task, data, side.options, progress, teacher)
        report.metrics["distill_weight"] = DISTILL_WEIGHT
        return report

    def temporary_tasks(self) -> tuple[str, ...]:
        """Tasks that live as side networks now, sorted."""
        return tuple(sorted(self._sides.live))

    # ------------------------------------------------------------------ serving and state

    def predictor(self) -> AgsclPredictor | TaskSidePredictor:
        """The immutable serving snapshot of the current version (the same object until the next operation).

        With temporary tasks (or forgotten ones) the snapshot answers those from their side networks.
        """
        if self._predictor is None:
            trunk = copy.deepcopy(self._trunk).eval().requires_grad_(False)
            skeleton = copy.deepcopy(trunk).to("meta") if self._stats and self._buffer_names else None
            base = AgsclPredictor(
                version=self.version,
                trunk=trunk,
                heads={t: copy.deepcopy(h).eval().requires_grad_(False) for t, h in self._heads.items()},
                audit_heads={t: copy.deepcopy(h).eval().requires_grad_(False) for t, h in self._audit_heads.items()},
                stats={t: {k: v.clone() for k, v in s.items()} for t, s in self._stats.items()},
                classes=dict(self._classes),
                unlearned=frozenset(self._unlearned),
                input_shape=self.config.input_shape,
                num_classes=self.config.num_classes,
                device=self._device,
                skeleton=skeleton,
            )
            self._predictor = (
                base
                if not self._sides.live and not self._forgotten_temporary
                else TaskSidePredictor(
                    base,
                    self._sides.live,
                    frozenset(self._forgotten_temporary),
                    self.config.num_classes,
                    self._device,
                )
            )
        return self._predictor

    def parameter_count(self) -> int:
        """Trainable parameters of the trunk, the live heads, the heads kept for audits and the side networks."""
        modules: list[nn.Module] = [self._trunk, *self._heads.values(), *self._audit_heads.values()]
        main = sum(p.numel() for module in modules for p in module.parameters())
        return main + self._sides.parameter_count()

    def describe(self) -> dict[str, float]:
        """Sizes: parameters, nodes, free nodes, regularizer values (Ω, one per node), units grown and pruned."""
        omega = self._omega(self._shares)
        return {
            "parameters": float(self.parameter_count()),
            "nodes": float(sum(v.numel() for v in omega.values())),
            "free_units": float(self._free_units(omega)),
            "regularizer_values": float(sum(v.numel() for v in omega.values())),
            "grown_units": float(self._grown_units),
            "pruned_units": float(self._pruned_units),
        }

    def importance(self) -> dict[str, torch.Tensor]:
        """Ω per node layer (a copy; for diagnostics and tests)."""
        return self._omega(self._shares)

    def hidden_widths(self) -> list[int]:
        """Current width of every node layer, in forward order."""
        return [width_of(self._trunk, layer) for layer in self._layers]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after a restart.

        The trunk (at its current widths), the template and every head, each task's BatchNorm
        statistics and share of Ω, the task registry, the capacity counters, the version, and the
        side networks of the TEMPORARY tasks (with the temporary tasks forgotten so far). Random
        draws come from generators derived from (seed, options.seed, version, ...), so seed and
        version are the whole RNG state; no optimizer state (every operation starts a fresh Adam).
        """
        return {
            "format": _STATE_FORMAT,
            "config": self.config.as_dict(),
            "version": self.version,
            "widths": self.hidden_widths(),
            "trunk": module_state_cpu(self._trunk),
            "template": module_state_cpu(self._template),
            "heads": {t: module_state_cpu(h) for t, h in self._heads.items()},
            "audit_heads": {t: module_state_cpu(h) for t, h in self._audit_heads.items()},
            "classes": {t: list(c) for t, c in self._classes.items()},
            "unlearned": sorted(self._unlearned),
            "stats": {t: {k: v.to("cpu", copy=True) for k, v in s.items()} for t, s in self._stats.items()},
            "shares": {t: {k: v.clone() for k, v in per.items()} for t, per in self._shares.items()},
            "grown_units": self._grown_units,
            "pruned_units": self._pruned_units,
            "side_networks": self._sides.state_dict(),
            "forgotten_temporary": sorted(self._forgotten_temporary),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; on error nothing is changed.

        Raises:
            ValueError: if the state is not an agscl state, was saved with a different configuration
                (any option but the seed, which is taken from the state), or is inconsistent.
        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not an agscl state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        # Options added after a state was saved are taken as configured (the state predates them).
        saved = {**self.config.as_dict(), **state["config"]}
        saved = {k: v for k, v in saved.items() if k != "seed"}
        configured = {k: v for k, v in self.config.as_dict().items() if k != "seed"}
        if saved != configured:
            differences = ", ".join(
                f"{key}: saved {saved.get(key)!r}, configured {configured.get(key)!r}"
                for key in sorted(set(saved) | set(configured))
                if saved.get(key) != configured.get(key)
            )
            raise ValueError(f"agscl state was saved with a different configuration ({differences})")
        widths = [int(w) for w in state["widths"]]
        trunk = self._trunk_with_widths(widths)
        trunk.load_state_dict(state["trunk"])
        template = linear_from_state(state["template"], self._device)
        heads = {str(t): linear_from_state(s, self._device) for t, s in state["heads"].items()}
        audit_heads = {str(t): linear_from_state(s, self._device) for t, s in state["audit_heads"].items()}
        classes = {str(t): tuple(int(c) for c in values) for t, values in state["classes"].items()}
        unlearned = {str(t) for t in state["unlearned"]}
        stats = {str(t): {k: v.to(self._device, copy=True) for k, v in s.items()} for t, s in state["stats"].items()}
        shares = {str(t): {k: v.clone().float() for k, v in per.items()} for t, per in state["shares"].items()}
        live = set(classes) - unlearned
        layer_widths = dict(zip((layer.name for layer in self._layers), widths, strict=True))
        if (
            set(heads) != live
            or set(shares) != live
            or not set(audit_heads) <= unlearned
            or any(set(s) != self._buffer_names for s in stats.values())
            or any(
                set(per) != set(layer_widths) or any(v.numel() != layer_widths[k] for k, v in per.items())
                for per in shares.values()
            )
        ):
            raise ValueError("agscl state is inconsistent: heads, classes, statistics and importances do not match")
        sides = self._sides.loaded(state.get("side_networks", []))  # absent from states saved before it existed
        if set(sides) & live:
            raise ValueError("agscl state is inconsistent: a task is both live and temporary")

        self._sides.replace(sides)
        self._forgotten_temporary = {str(t) for t in state.get("forgotten_temporary", [])}
        self.config = dataclasses.replace(self.config, seed=int(state["config"]["seed"]))
        self._trunk = trunk
        self._template = template
        self._heads = heads
        self._audit_heads = audit_heads
        self._classes = classes
        self._unlearned = unlearned
        self._stats = stats
        self._shares = shares
        self._grown_units = int(state["grown_units"])
        self._pruned_units = int(state["pruned_units"])
        self.version = int(state["version"])
        self._predictor = None

    def _trunk_with_widths(self, widths: list[int]) -> nn.Module:
        """A copy of the trunk with node-layer ``widths`` (values to be loaded)."""
        trunk = copy.deepcopy(self._trunk)
        if widths != self.hidden_widths():
            if self.config.backbone not in RESIZABLE_BACKBONES:
                raise ValueError(
                    f"agscl state has widths {widths}, but backbone {self.config.backbone!r} cannot resize"
                )
            capacity.reshape(
                trunk, self._layers, dict(zip((layer.name for layer in self._layers), widths, strict=True))
            )
        return trunk


def _fresh_buffers(trunk: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm statistics of a fresh layer for every buffer of ``trunk`` (what a new task starts from)."""
    fresh: dict[str, torch.Tensor] = {}
    for name, buffer in trunk.named_buffers():
        if name.endswith("running_var"):
            fresh[name] = torch.ones_like(buffer)
        else:
            fresh[name] = torch.zeros_like(buffer)
    return fresh
