"""The immutable serving snapshot of an UnCLE strategy."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from server.engine.networks import standalone_from_state
from server.engine.protocol import UnknownTaskError, UnlearnedTaskError
from server.engine.training import check_predict_inputs, cpu_float32, mask_unseen, to_device, unseen_classes
from server.engine.uncle.hypernetwork import ChunkedHypernetwork


@dataclass(frozen=True)
class ServedTask:
    """What a predictor needs to serve one task; never modified after construction.

    Attributes:
        embedding: the task embedding ``[embedding_dim]`` (a private copy).
        buffers: the task's own BatchNorm running statistics (private copies), name → tensor.
        mask: bool ``[num_classes]``, True at the classes the task has seen.
        unlearned: the task was unlearned.
    """

    embedding: torch.Tensor
    buffers: Mapping[str, torch.Tensor]
    mask: torch.Tensor
    unlearned: bool


@dataclass(frozen=True)
class _Generated:
    """A task's generated network at one version: its parameters, a backbone that holds them, its size.

    Attributes:
        parameters: the generated parameters, name → tensor (read-only mapping).
        module: a copy of the backbone in eval mode holding ``parameters`` and the task's buffers.
        nbytes: bytes of its parameters and buffers, what it costs the cache.
    """

    parameters: Mapping[str, torch.Tensor]
    module: nn.Module
    nbytes: int


@dataclass(frozen=True)
class CacheStats:
    """Counters of a predictor's cache of generated networks.

    Attributes:
        hits: predicts served by a cached network.
        misses: predicts that generated their network (cached afterwards or not).
        evictions: networks dropped to keep the cache within its budget.
        entries: networks cached now.
        bytes: parameter and buffer bytes of the cached networks now.
        budget_bytes: the most bytes the cache may hold (0 = nothing is cached).
    """

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    budget_bytes: int


class UnclePredictor:
    """Predictions of one model version, safe to call from many threads at once.

    Generated networks are cached per task in a cache bounded by bytes, least recently used out
    first: a predict of a task that is not cached runs the hypernetwork once (under a lock, so
    concurrent first calls generate once) and assigns the result, with the task's BatchNorm
    statistics, to its own copy of the backbone in eval mode. Every later predict of a cached task
    is one ordinary forward pass of that module, as cheap as the backbone with ordinary weights.
    In eval mode under ``no_grad`` a forward pass changes nothing in the module, so threads share
    it. A network is charged its parameter and buffer bytes; after a miss the least recently used
    networks are dropped until the cache fits ``cache_bytes`` again. A network larger than the
    whole budget (and every network with ``cache_bytes = 0``) is generated for the call and not
    kept. An evicted task is generated again on its next predict, bit-identical (the hypernetwork
    and the task's embedding are frozen in the snapshot). Callers that still hold an evicted
    network keep it alive until they are done, so memory can exceed the budget by the networks
    in use; while the worker swaps snapshots, the old one's cache lives until its last predict.

    Hits take a short lock (to reorder the LRU) that generation never holds: predicts of cached
    tasks never wait for another task being generated.

    Args:
        version: the model version this snapshot serves.
        hypernetwork: a frozen φ of this version; never modified afterwards.
        tasks: task name → :class:`ServedTask`, for every learned and unlearned task.
        skeleton: the backbone structure; copied and moved to ``meta``.
        input_shape: shape of one sample.
        device: where the hypernetwork lives and prediction runs.
        cache_bytes: the most parameter and buffer bytes of generated networks kept (0 = none).

    Raises:
        ValueError: if ``cache_bytes`` is negative.
    """

    def __init__(
        self,
        *,
        version: int,
        hypernetwork: ChunkedHypernetwork,
        tasks: Mapping[str, ServedTask],
        skeleton: nn.Module,
        input_shape: tuple[int, ...],
        device: torch.device,
        cache_bytes: int = 512 * 2**20,
    ) -> None:
        self.version = version
        self._hypernetwork = hypernetwork
        self._tasks = MappingProxyType(dict(tasks))
        # Logits to mask per task: None when the task has seen every class (nothing to mask).
        self._unseen = {name: unseen_classes(t.mask) for name, t in self._tasks.items()}
        self._template = copy.deepcopy(skeleton).to("meta").eval().requires_grad_(False)
        self._input_shape = input_shape
        self._device = device
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes!r}")
        self._budget = int(cache_bytes)
        self._cache: OrderedDict[str, _Generated] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()  # guards the cache and the counters; held only briefly
        self._generating = threading.Lock()  # serializes generation, so concurrent misses generate once

    @property
    def tasks(self) -> tuple[str, ...]:
        """Names of the tasks this snapshot knows (learned and unlearned)."""
        return tuple(self._tasks)

    def predict(self, task: str | None, inputs: torch.Tensor, *, allow_unlearned: bool = False) -> torch.Tensor:
        """Return logits ``[n, num_classes]`` (CPU float32) of ``task`` for ``inputs`` ``[n, *input_shape]``.

        Logits of classes the task never saw are ``-inf``. With ``allow_unlearned`` an UNLEARNED
        task is evaluated with what the hypernetwork now generates for its embedding, so an
        auditor can check on their own data that the task is forgotten.

        Raises:
            ValueError: if ``task`` is ``None`` (UnCLE is task-incremental) or the inputs have the
                wrong shape or dtype.
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if the task was unlearned and ``allow_unlearned`` is False.
        """
        generated = self._generated(task, allow_unlearned)
        assert task is not None  # _generated refuses None
        x = to_device(check_predict_inputs(inputs, self._input_shape), self._device)
        with torch.no_grad():
            logits = generated.module(x)
        return cpu_float32(mask_unseen(logits, self._unseen[task]))

    def network(self, task: str | None) -> nn.Module:
        """The network :meth:`predict` serves for ``task``, with its generated weights baked in.

        A plain backbone (no hypernetwork inside) holding the task's generated parameters and
        BatchNorm statistics, CPU float32, eval mode; wrapped in ``MaskedLogits`` when the task has
        not seen every class, so its logits equal :meth:`predict`'s, ``-inf`` included.

        Raises:
            ValueError: if ``task`` is ``None``.
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if the task was unlearned.
        """
        generated = self._generated(task, allow_unlearned=False)
        assert task is not None  # _generated refuses None
        served = self._tasks[task]
        return standalone_from_state(self._template, {**generated.parameters, **served.buffers}, served.mask)

    def parameters_for(self, task: str, *, allow_unlearned: bool = False) -> Mapping[str, torch.Tensor]:
        """The generated backbone parameters of ``task`` at this version.

        The same object on every call while the task stays cached; generated again (equal values,
        a new object) after it was evicted.

        Raises:
            UnknownTaskError: if the task was never learned.
            UnlearnedTaskError: if the task was unlearned and ``allow_unlearned`` is False.
        """
        return self._generated(task, allow_unlearned).parameters

    def cache_stats(self) -> CacheStats:
        """The cache's counters and size now."""
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._cache), self._bytes, self._budget)

    def describe(self) -> dict[str, float]:
        """The cache's counters as numbers (``predict_cache_*``), e.g. for metrics or diagnostics."""
        stats = self.cache_stats()
        return {
            "predict_cache_hits": float(stats.hits),
            "predict_cache_misses": float(stats.misses),
            "predict_cache_evictions": float(stats.evictions),
            "predict_cache_entries": float(stats.entries),
            "predict_cache_bytes": float(stats.bytes),
            "predict_cache_budget_bytes": float(stats.budget_bytes),
        }

    def _generated(self, task: str | None, allow_unlearned: bool) -> _Generated:
        served = self._served(task, allow_unlearned)
        assert task is not None
        cached = self._lookup(task)
        if cached is not None:
            return cached
        with self._generating:
            cached = self._lookup(task)  # another thread may have generated it meanwhile
            if cached is not None:
                return cached
            generated = self._generate(served)
            with self._lock:
                self._misses += 1
                if generated.nbytes <= self._budget:
                    self._cache[task] = generated
                    self._bytes += generated.nbytes
                    while self._bytes > self._budget:
                        _, evicted = self._cache.popitem(last=False)
                        self._bytes -= evicted.nbytes
                        self._evictions += 1
        return generated

    def _lookup(self, task: str) -> _Generated | None:
        """The cached network of ``task``, marked most recently used (a hit), or None."""
        with self._lock:
            cached = self._cache.get(task)
            if cached is not None:
                self._cache.move_to_end(task)
                self._hits += 1
            return cached

    def _generate(self, served: ServedTask) -> _Generated:
        """Run the hypernetwork for ``served`` and load the result into a fresh copy of the backbone."""
        with torch.no_grad():
            parameters = self._hypernetwork.generate(served.embedding)
        module = copy.deepcopy(self._template)
        module.load_state_dict({**parameters, **served.buffers}, assign=True)
        nbytes = sum(t.numel() * t.element_size() for t in (*parameters.values(), *served.buffers.values()))
        return _Generated(MappingProxyType(parameters), module, nbytes)

    def _served(self, task: str | None, allow_unlearned: bool) -> ServedTask:
        if task is None:
            raise ValueError("strategy 'uncle' is task-incremental: predict needs a task name")
        served = self._tasks.get(task)
        if served is None:
            raise UnknownTaskError(f"task {task!r} was never learned")
        if served.unlearned and not allow_unlearned:
            raise UnlearnedTaskError(f"task {task!r} was unlearned")
        return served
