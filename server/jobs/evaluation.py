"""Strategy-agnostic evaluation: probe sets, the accuracy matrix row, spill, relapse, MIA, UNI and forgetting checks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from server.data import BlobStore
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

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self._cache: dict[str, ProbeSet] = {}

    def get(self, relative: str) -> ProbeSet:
        """Load ``relative`` (an ``.npz`` with ``inputs`` and ``labels``) or return the cached copy."""
        found = self._cache.get(relative)
        if found is None:
            arrays = self.blobs.load_arrays(relative)
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
            attack = metrics.mia_with_null(
                metrics.per_sample_loss(member_logits, torch.from_numpy(members.labels)),
                metrics.per_sample_loss(probe_logits, torch.from_numpy(probe.labels)),
                seed=seed,
            )
            result.update(
                {
                    "mia": attack.score,
                    "mia_known": float(attack.known),
                    "mia_null_low": attack.null_low,
                    "mia_null_high": attack.null_high,
                    "mia_p_value": attack.p_value,
                    "mia_members": float(attack.members),
                    "mia_nonmembers": float(attack.nonmembers),
                }
            )
    return result


@dataclass(frozen=True)
class ForgetCheck:
    """Whether a forgotten task is measured at its reference (DESIGN.md section 9; docs/metrics.md).

    Attributes:
        verified: on the probe set and on the member sample, the balanced accuracy is within
            ``tolerance`` points of an exact reference (chance), or the reference estimated on
            the probe (class-incremental) lies within ``tolerance`` points of the members'
            95% interval.
        metrics: the job metrics ``forget_*`` (percent or points).
    """

    verified: bool
    metrics: dict[str, float]


def _distance(reference: float, low: float, high: float) -> float:
    """Points from ``reference`` to the interval ``[low, high]`` (0 inside it)."""
    return max(0.0, low - reference, reference - high)


def verify_forgetting(
    predictor: Predictor,
    task: str,
    members: ProbeSet | None,
    probe: ProbeSet | None,
    *,
    task_incremental: bool,
    tolerance: float,
) -> ForgetCheck | None:
    """Measure an unlearned task against its reference on its probe set and its member sample.

    The measure is balanced accuracy (mean per-class recall), so a task answering one class for
    everything scores its chance level whatever the classes' shares. The reference is chance,
    ``100 / k`` for the ``k`` classes the task saw (the columns its logits do not mask), for a
    task-incremental model; for a class-incremental one it is the never-seen model, estimated by
    the balanced accuracy on the probe set (held out: the model never trained on it), against
    which the members (trained on) must not stand out.

    Args:
        predictor: the model after the unlearn.
        task: the unlearned task.
        members: samples the task was trained on (kept for this), or None.
        probe: its held-out samples, or None.
        task_incremental: whether Predict takes the task's name.
        tolerance: points a measure may lie from an exact reference, or an estimated reference
            from the measure's 95% interval.

    Returns:
        The verdict and its metrics; None when there is nothing to measure (no samples, or no
        probe set to estimate a class-incremental reference from).
    """
    name = task if task_incremental else None
    measured: dict[str, tuple[float, int, torch.Tensor]] = {}
    for which, samples in (("probe", probe), ("members", members)):
        if samples is not None and len(samples.labels):
            logits = logits_for(predictor, name, samples.inputs, allow_unlearned=True)
            labels = torch.from_numpy(samples.labels)
            measured[which] = (metrics.balanced_accuracy(logits, labels), len(samples.labels), logits)
    result: dict[str, float] = {}
    if task_incremental and measured:
        logits = torch.cat([m[2] for m in measured.values()])
        classes = int((~torch.isinf(logits).all(dim=0)).sum())
        reference = 100.0 / max(classes, 1)
        result["forget_reference_classes"] = float(classes)
    elif "probe" in measured:
        reference = measured["probe"][0]
    else:
        return None
    result["forget_reference"] = reference
    distances = []
    suffixes = {"probe": "", "members": "_members"}
    for which, (balanced, n, _) in measured.items():
        low, high = metrics.balanced_accuracy_interval(balanced, n)
        suffix = suffixes[which]
        result[f"forget_balanced_accuracy{suffix}"] = balanced
        result[f"forget_accuracy{suffix}_low"] = low
        result[f"forget_accuracy{suffix}_high"] = high
        result[f"forget_samples{suffix}"] = float(n)
        result[f"forget_gap_{which}"] = balanced - reference
        # Chance is exact: the measure itself must be near it (a 36-sample interval spans ±16
        # points and let 65.6% on the members pass). An estimated reference is itself noisy, so
        # there only what lies beyond the interval counts.
        distances.append(abs(balanced - reference) if task_incremental else _distance(reference, low, high))
    result["forget_gap"] = max(abs(result[f"forget_gap_{w}"]) for w in measured)
    result["forget_excess"] = max(distances)
    result["forget_tolerance"] = tolerance
    verified = result["forget_excess"] <= tolerance
    result["forget_verified"] = float(verified)
    return ForgetCheck(verified=verified, metrics=result)


def verdict(job_metrics: Mapping[str, float]) -> str:
    """One line on the forgetting check of an unlearn job's metrics (its message and audit text)."""
    if "forget_verified" not in job_metrics:
        return "forgetting not measured (no probe or member samples)"
    m = job_metrics
    line = (
        f"balanced accuracy {m.get('forget_balanced_accuracy', math.nan):.1f}% on the probe, "
        f"{m.get('forget_balanced_accuracy_members', math.nan):.1f}% on the members, "
        f"reference {m['forget_reference']:.1f}%; gap {m['forget_gap']:.1f} points, "
        f"{m['forget_excess']:.1f} counted (tolerance {m['forget_tolerance']:.1f})"
    )
    attempts = int(m.get("forget_attempts", 1))
    return line + (f" after {attempts} attempts" if attempts > 1 else "")
