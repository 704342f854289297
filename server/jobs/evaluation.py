"""Strategy-agnostic evaluation: probe sets, the accuracy matrix row, spill, relapse, MIA and UNI."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.data import load_arrays
from server.engine import metrics
from server.engine.protocol import Predictor, UnknownTaskError

#: Samples per forward pass during evaluation.
_EVAL_BATCH = 1024


@dataclass(frozen=True)
class ProbeSet:
    """Held-out samples of one task (never trained on)."""

    inputs: np.ndarray  # float32 [n, *input_shape]
    labels: np.ndarray  # int64 [n]


class ProbeCache:
    """Probe and member files read once and kept in memory until they are purged."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._cache: dict[str, ProbeSet] = {}

    def get(self, relative: str) -> ProbeSet:
        """Load ``relative`` (an ``.npz`` with ``inputs`` and ``labels``) or return the cached copy."""
        found = self._cache.get(relative)
        if found is None:
            arrays = load_arrays(self.data_dir / relative)
            found = ProbeSet(arrays["inputs"], arrays["labels"])
            self._cache[relative] = found
        return found

    def drop(self, relative: str) -> None:
        """Forget a purged file."""
        self._cache.pop(relative, None)


def logits_for(predictor: Predictor, task: str | None, inputs: np.ndarray, *, allow_unlearned: bool) -> torch.Tensor:
    """Logits ``[n, classes]`` of ``inputs`` in batches."""
    outputs = []
    for start in range(0, len(inputs), _EVAL_BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(inputs[start : start + _EVAL_BATCH]))
        outputs.append(predictor.predict(task, batch, allow_unlearned=allow_unlearned))
    return torch.cat(outputs)


def evaluate(predictor: Predictor, probes: Mapping[str, ProbeSet], *, task_incremental: bool) -> dict[str, float]:
    """Accuracy (%) of every task that has a probe set; tasks the model does not know are left out."""
    accuracies: dict[str, float] = {}
    for task, probe in probes.items():
        try:
            logits = logits_for(predictor, task if task_incremental else None, probe.inputs, allow_unlearned=True)
        except UnknownTaskError:
            continue
        accuracies[task] = metrics.accuracy(logits, torch.from_numpy(probe.labels))
    return accuracies


def forget_quality(
    predictor: Predictor,
    task: str,
    members: ProbeSet | None,
    probe: ProbeSet | None,
    *,
    task_incremental: bool,
    seed: int,
) -> dict[str, float]:
    """MIA (%) and UNI (%) of a just-unlearned task; NaN where the data is missing."""
    result = {"mia": math.nan, "uni": math.nan}
    name = task if task_incremental else None
    if probe is not None and len(probe.labels):
        probe_logits = logits_for(predictor, name, probe.inputs, allow_unlearned=True)
        finite = torch.where(torch.isinf(probe_logits), torch.full_like(probe_logits, -1e9), probe_logits)
        probs = torch.softmax(finite, dim=1)
        if task_incremental:
            # Over the classes the task has: the rest are masked to -inf and carry no probability.
            keep = ~torch.isinf(probe_logits).all(dim=0)
            probs = probs[:, keep]
        result["uni"] = metrics.uni(probs.numpy())
        if members is not None and len(members.labels):
            member_logits = logits_for(predictor, name, members.inputs, allow_unlearned=True)
            result["mia"] = metrics.mia(
                metrics.per_sample_loss(member_logits, torch.from_numpy(members.labels)),
                metrics.per_sample_loss(probe_logits, torch.from_numpy(probe.labels)),
                seed=seed,
            )
    return result
