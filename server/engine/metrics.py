"""Evaluation metrics as DESIGN.md section 5 defines them: pure functions, numpy or torch inputs.

Accuracies are percentages in [0, 100]. Functions return ``nan`` when a metric is undefined for
their input (no samples, no tasks), never raise for that, so a dashboard can show "unknown".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

#: Anything :func:`numpy.asarray` or a torch tensor: logits, probabilities, labels, losses.
ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

__all__ = [
    "MIA_MIN_SAMPLES",
    "MiaResult",
    "accuracy",
    "backward_transfer",
    "balanced_accuracy",
    "balanced_accuracy_interval",
    "expected_calibration_error",
    "forget_accuracy",
    "forgetting",
    "mia",
    "mia_with_null",
    "per_sample_loss",
    "relapse",
    "retain_accuracy",
    "spill",
    "uni",
    "wilson_interval",
]


def _numpy(values: ArrayLike, dtype: type[np.generic] = np.float64) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _scores_and_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return ``scores`` as float64 ``[n, C]`` and ``labels`` as int64 ``[n]``; check they match."""
    s = _numpy(scores)
    y = _numpy(labels, np.int64).reshape(-1)
    if s.ndim != 2 or s.shape[0] != y.shape[0]:
        raise ValueError(f"expected scores [n, C] and labels [n], got {s.shape} and {y.shape}")
    return s, y


def accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy in percent.

    Args:
        logits: ``[n, C]`` scores (logits or probabilities; ``-inf`` allowed).
        labels: ``[n]`` integer classes.

    Returns:
        ``100 * mean(argmax(logits) == labels)``; ``nan`` when ``n == 0``.
    """
    s, y = _scores_and_labels(logits, labels)
    if y.size == 0:
        return math.nan
    return float(100.0 * np.mean(np.argmax(s, axis=1) == y))


def balanced_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Balanced accuracy in percent: the mean per-class recall over the classes present in ``labels``.

    A model that answers one class for everything scores exactly ``100 / k`` on ``k`` classes,
    whatever the classes' shares: it knows nothing, and raw accuracy would say otherwise.

    Args:
        logits: ``[n, C]`` scores (logits or probabilities; ``-inf`` allowed).
        labels: ``[n]`` integer classes.

    Returns:
        ``100 * mean over classes c in labels of mean(argmax == c | label == c)``; ``nan`` when ``n == 0``.
    """
    s, y = _scores_and_labels(logits, labels)
    if y.size == 0:
        return math.nan
    predicted = np.argmax(s, axis=1)
    recalls = [np.mean(predicted[y == c] == c) for c in np.unique(y)]
    return float(100.0 * np.mean(recalls))


#: z of a two-sided 95% normal interval.
_Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, *, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, in percent (95% by default).

    ``(p̂ + z²/2n ± z·sqrt(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n)`` with ``p̂ = successes / n``.
    Unlike the normal approximation it stays inside [0, 100] and is not empty at 0 or n successes.

    Args:
        successes: number of successes (a float is accepted: see :func:`balanced_accuracy_interval`).
        n: number of trials.
        z: normal quantile of the confidence level.

    Returns:
        ``(low, high)`` in percent; ``(nan, nan)`` when ``n == 0``.
    """
    if n <= 0:
        return math.nan, math.nan
    p = min(max(successes / n, 0.0), 1.0)
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denominator
    return 100.0 * max(0.0, center - half), 100.0 * min(1.0, center + half)


def balanced_accuracy_interval(balanced: float, n: int) -> tuple[float, float]:
    """A 95% interval (percent) for a balanced accuracy measured on ``n`` samples.

    The Wilson interval of the proportion ``balanced / 100`` with the sample size ``n``. For
    classes of equal size (the probe and member samples are random splits of a task's data, so
    nearly so) balanced accuracy is the plain accuracy and this is its exact Wilson interval; with
    unequal classes the true interval is somewhat wider for the rare classes, which this
    approximation ignores.

    Args:
        balanced: balanced accuracy in percent.
        n: number of samples it was measured on.

    Returns:
        ``(low, high)`` in percent; ``(nan, nan)`` when ``n == 0`` or the measure is ``nan``.
    """
    if math.isnan(balanced):
        return math.nan, math.nan
    return wilson_interval(balanced / 100.0 * n, n)


def _mean_of_known(accuracies: Mapping[str, float]) -> float:
    known = [float(a) for a in accuracies.values() if not math.isnan(float(a))]
    return float(np.mean(known)) if known else math.nan


def retain_accuracy(learned: Mapping[str, float]) -> float:
    """Retain accuracy RA: mean accuracy (percent) over the LEARNED tasks.

    Args:
        learned: accuracy of every LEARNED task, by task name. ``nan`` entries (no measurement)
            are skipped.

    Returns:
        The mean, or ``nan`` when there is no measured task.
    """
    return _mean_of_known(learned)


def forget_accuracy(unlearned: Mapping[str, float]) -> float:
    """Forget accuracy FA: mean accuracy (percent) over UNLEARNED tasks that still have a probe set.

    Args:
        unlearned: accuracy of every UNLEARNED task with a probe set, by task name. ``nan``
            entries are skipped.

    Returns:
        The mean, or ``nan`` when there is no measured task.
    """
    return _mean_of_known(unlearned)


def spill(before: Mapping[str, float], after: Mapping[str, float], forgotten: str, learned: Iterable[str]) -> float:
    """Spill of an unlearn: how much the accuracy of the *other* tasks moved, in percentage points.

    ``spill = sum over t in learned, t != forgotten, of |before[t] - after[t]|``, where ``before``
    is the evaluation row ``a_{u-1}`` and ``after`` the row ``a_u`` of the unlearn job ``u``.

    Args:
        before: accuracy (percent) of each task before the unlearn.
        after: accuracy (percent) of each task after the unlearn.
        forgotten: the unlearned task; never counted.
        learned: tasks that were LEARNED at the unlearn. A task missing from ``before`` or
            ``after``, or measured as ``nan`` (no probe set), is skipped.

    Returns:
        The sum (0.0 when no task counts).
    """
    total = 0.0
    for task in dict.fromkeys(learned):  # unique, in order
        if task == forgotten or task not in before or task not in after:
            continue
        change = abs(float(before[task]) - float(after[task]))
        if not math.isnan(change):
            total += change
    return total


def relapse(at_unlearn: float, latest: float) -> float:
    """Relapse of an unlearned task: ``|a_{u_f}^f - a_e^f|`` in percentage points.

    Args:
        at_unlearn: the task's accuracy measured right after its unlearn ``u_f``.
        latest: its accuracy at the latest evaluation ``e``.

    Returns:
        The absolute difference; ``nan`` if either is unknown.
    """
    return abs(float(latest) - float(at_unlearn))


def uni(probs: ArrayLike) -> float:
    """Uniformity of the predictions on a forget probe set: ``100 * (1 - JS(p̄, uniform))``.

    ``p̄`` is the mean predicted distribution over the samples; JS is the textbook Jensen–Shannon
    divergence with base-2 logarithms (so in [0, 1]):
    ``JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``. The uniform
    distribution is over the columns of ``probs``: for a task-incremental model pass only the
    task's classes (renormalized) if "uniform" should mean uniform over those.

    Args:
        probs: ``[n, C]`` predicted probabilities, rows summing to 1.

    Returns:
        100 for a perfectly uniform mean prediction, lower the further ``p̄`` is from uniform
        (about 24.2 for a one-hot ``p̄`` over 10 classes); ``nan`` when ``n == 0``.
    """
    p = _numpy(probs)
    if p.ndim != 2:
        raise ValueError(f"expected probs [n, C], got shape {p.shape}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        return math.nan
    mean = p.mean(axis=0)
    mean = mean / mean.sum()
    uniform = np.full_like(mean, 1.0 / mean.size)
    mixture = 0.5 * (mean + uniform)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        support = a > 0  # 0 * log 0 = 0
        return float(np.sum(a[support] * np.log2(a[support] / b[support])))

    js = 0.5 * kl(mean, mixture) + 0.5 * kl(uniform, mixture)
    return float(100.0 * (1.0 - min(max(js, 0.0), 1.0)))


def per_sample_loss(logits: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Cross-entropy loss of each sample (natural log), as the MIA attack's feature.

    Args:
        logits: ``[n, C]`` logits; ``-inf`` for masked classes is allowed.
        labels: ``[n]`` integer classes.

    Returns:
        float64 ``[n]``; ``inf`` where the true class has ``-inf`` logit.
    """
    s, y = _scores_and_labels(logits, labels)
    with torch.no_grad():
        loss = F.cross_entropy(torch.from_numpy(s), torch.from_numpy(y), reduction="none")
    return loss.numpy().astype(np.float64)


def _attack_data(
    member_losses: ArrayLike, nonmember_losses: ArrayLike, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The attack's balanced data set: features ``[2k, 1]`` and targets ``[2k]`` (1 = member).

    The larger side is subsampled (without replacement, with ``seed``) to the size of the smaller
    one; infinite losses become a finite ceiling. ``None`` when either side is empty.
    """
    members = _numpy(member_losses).reshape(-1)
    nonmembers = _numpy(nonmember_losses).reshape(-1)
    if members.size == 0 or nonmembers.size == 0:
        return None
    rng = np.random.default_rng(seed)
    k = min(members.size, nonmembers.size)
    if members.size > k:
        members = rng.choice(members, size=k, replace=False)
    if nonmembers.size > k:
        nonmembers = rng.choice(nonmembers, size=k, replace=False)
    features = np.concatenate([members, nonmembers])
    # An infinite loss (true class masked out) is "larger than any finite loss", not a hole in the data.
    finite = features[np.isfinite(features)]
    ceiling = float(finite.max()) + 1.0 if finite.size else 1.0
    features = np.nan_to_num(features, nan=ceiling, posinf=ceiling, neginf=0.0).reshape(-1, 1)
    targets = np.concatenate([np.ones(k, dtype=np.int64), np.zeros(k, dtype=np.int64)])
    return features, targets


def mia(member_losses: ArrayLike, nonmember_losses: ArrayLike, *, seed: int = 0, folds: int = 5) -> float:
    """Membership-inference score: cross-validated accuracy (%) of a loss-based attack.

    A logistic regression (on the standardized per-sample loss) learns to tell members (the
    forgotten task's training samples) from non-members (its probe samples). The larger side is
    subsampled (without replacement, with ``seed``) to the size of the smaller one, so chance is
    50%; the attack is scored by stratified, shuffled ``folds``-fold cross-validation. After a
    perfect unlearning the score is about 50, but with few samples the cross-validated estimate
    is biased below 50 and spread widely: :func:`mia_with_null` gives its null interval.

    Args:
        member_losses: per-sample losses of members ``[n_m]``.
        nonmember_losses: per-sample losses of non-members ``[n_n]``.
        seed: seeds the subsampling and the fold assignment.
        folds: number of cross-validation folds (>= 2).

    Returns:
        Mean accuracy over the folds in percent; ``nan`` if either side has fewer than ``folds``
        samples.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    data = _attack_data(member_losses, nonmember_losses, seed)
    if data is None or len(data[1]) // 2 < folds:
        return math.nan
    features, targets = data
    # scikit-learn (~1-3 s of imports) only where an MIA runs, not at server start.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    attack = make_pipeline(StandardScaler(), LogisticRegression())
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(attack, features, targets, cv=splitter, scoring="accuracy")
    return float(100.0 * np.mean(scores))


#: Fewer members or non-members than this and the MIA is "unknown": its estimate is mostly noise.
MIA_MIN_SAMPLES = 20
#: Label permutations of the MIA's null distribution (about 0.2 s for 72 samples on one core).
MIA_PERMUTATIONS = 200


@dataclass(frozen=True)
class MiaResult:
    """A membership-inference score with its distribution under "no membership signal".

    Attributes:
        score: the attack's cross-validated accuracy (%) (:func:`mia`); ``nan`` when unknown.
        null_low: 2.5th percentile (%) of the score with member/non-member labels shuffled.
        null_high: 97.5th percentile (%) of the same null distribution.
        p_value: two-sided permutation p-value: the share of null scores at least as far from
            the null median as ``score`` (with the observed one counted, so never 0).
        members: member samples given.
        nonmembers: non-member samples given.
        known: False when either side has fewer than :data:`MIA_MIN_SAMPLES` samples; then the
            other numbers are ``nan``.
    """

    score: float
    null_low: float
    null_high: float
    p_value: float
    members: int
    nonmembers: int
    known: bool


def _fold_scores(features: np.ndarray, targets: np.ndarray, splits: list[list[np.ndarray]], c: float) -> np.ndarray:
    """Cross-validated accuracy (%) of the 1-D attack for many labelings at once.

    The same model as :func:`mia`'s pipeline (standardize on the training folds, then a logistic
    regression with sklearn's objective ``w²/2 + C·Σ log-loss``, intercept not penalized), solved
    by Newton's method for every (labeling, fold) together: two unknowns each, so a few
    vectorized iterations replace thousands of solver calls.

    Args:
        features: ``[n]`` losses (finite).
        targets: ``[P, n]`` 0/1 labelings.
        splits: for each labeling, ``folds`` index arrays of its test folds.
        c: inverse regularization strength (sklearn's ``C``).

    Returns:
        ``[P]`` mean fold accuracy in percent.
    """
    labelings, n = targets.shape
    folds = len(splits[0])
    test = np.zeros((labelings, folds, n), dtype=bool)
    for p, parts in enumerate(splits):
        for f, part in enumerate(parts):
            test[p, f, part] = True
    train = ~test
    count = train.sum(axis=2, keepdims=True)
    mean = (train * features).sum(axis=2, keepdims=True) / count
    std = np.sqrt((train * (features - mean) ** 2).sum(axis=2, keepdims=True) / count)
    std = np.where(std > 0, std, 1.0)  # StandardScaler leaves a constant feature unscaled
    z = (features - mean) / std  # [P, F, n]
    y = np.broadcast_to(targets[:, None, :], z.shape).astype(np.float64)
    weight = train.astype(np.float64)
    w = np.zeros((labelings, folds, 1))
    b = np.zeros((labelings, folds, 1))
    for _ in range(50):
        prob = 1.0 / (1.0 + np.exp(-np.clip(w * z + b, -500, 500)))
        residual = weight * (prob - y)
        curvature = weight * prob * (1.0 - prob)
        g_w = w[..., 0] + c * (residual * z).sum(axis=2)
        g_b = c * residual.sum(axis=2)
        h_ww = 1.0 + c * (curvature * z * z).sum(axis=2)
        h_wb = c * (curvature * z).sum(axis=2)
        h_bb = c * curvature.sum(axis=2) + 1e-12
        det = h_ww * h_bb - h_wb * h_wb
        step_w = (h_bb * g_w - h_wb * g_b) / det
        step_b = (h_ww * g_b - h_wb * g_w) / det
        w -= step_w[..., None]
        b -= step_b[..., None]
        if max(np.abs(step_w).max(), np.abs(step_b).max()) < 1e-10:
            break
    predicted = (w * z + b) > 0  # sklearn predicts the member class only for a positive decision
    correct = (predicted == (y > 0.5)) & test
    per_fold = correct.sum(axis=2) / test.sum(axis=2)
    return 100.0 * per_fold.mean(axis=1)


def mia_with_null(
    member_losses: ArrayLike,
    nonmember_losses: ArrayLike,
    *,
    seed: int = 0,
    folds: int = 5,
    permutations: int = MIA_PERMUTATIONS,
    min_samples: int = MIA_MIN_SAMPLES,
) -> MiaResult:
    """The MIA (:func:`mia`) with its permutation null distribution and sample sizes.

    The null is the same attack, scored the same way, on the same losses with the member and
    non-member labels shuffled (``permutations`` times, seeded): the scores an attack reaches
    when there is nothing to find. Its 2.5/97.5 percentiles are the null interval; a score inside
    it is indistinguishable from chance at this sample size (the cross-validated estimate is biased
    below 50 with few samples, and the null captures that bias as well as the spread).

    Args:
        member_losses: per-sample losses of members ``[n_m]``.
        nonmember_losses: per-sample losses of non-members ``[n_n]``.
        seed: seeds the subsampling, the fold assignment and the permutations.
        folds: cross-validation folds (>= 2).
        permutations: label shufflings of the null (>= 1).
        min_samples: below this many members or non-members the result is unknown.

    Returns:
        The score, its null interval and p-value, and the sample sizes.
    """
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    members = _numpy(member_losses).reshape(-1)
    nonmembers = _numpy(nonmember_losses).reshape(-1)
    unknown = MiaResult(math.nan, math.nan, math.nan, math.nan, members.size, nonmembers.size, False)
    if min(members.size, nonmembers.size) < max(min_samples, folds):
        return unknown
    score = mia(members, nonmembers, seed=seed, folds=folds)
    data = _attack_data(members, nonmembers, seed)
    if data is None or math.isnan(score):
        return unknown
    features, targets = data[0][:, 0], data[1]
    from sklearn.model_selection import StratifiedKFold  # imported by mia() above: no start-up cost

    rng = np.random.default_rng([seed, 0x4D4941])  # independent of the subsampling's stream
    shuffled = np.stack([rng.permutation(targets) for _ in range(permutations)])
    splits = [
        [part for _, part in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, t)]
        for t in shuffled
    ]
    null = _fold_scores(features, shuffled, splits, c=1.0)
    center = float(np.median(null))
    extreme = int(np.sum(np.abs(null - center) >= abs(score - center) - 1e-9))
    return MiaResult(
        score=score,
        null_low=float(np.percentile(null, 2.5)),
        null_high=float(np.percentile(null, 97.5)),
        p_value=(1 + extreme) / (1 + permutations),
        members=members.size,
        nonmembers=nonmembers.size,
        known=True,
    )


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins (L1 norm).

    ``ECE = sum over bins b of (|B_b| / n) * |acc(B_b) - conf(B_b)|`` where a sample's confidence
    is its top probability and it is correct when the top class is its label. Binning matches
    torchmetrics' ``MulticlassCalibrationError(norm="l1")`` exactly: bin ``b`` holds
    confidences in ``[b / n_bins, (b + 1) / n_bins)``, and a confidence of exactly 1.0 forms a
    bin of its own.

    Args:
        probs: ``[n, C]`` predicted probabilities.
        labels: ``[n]`` integer classes.
        n_bins: number of bins (>= 1).

    Returns:
        The ECE as a fraction in [0, 1] (like torchmetrics, not a percentage); ``nan`` when
        ``n == 0``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _scores_and_labels(probs, labels)
    if y.size == 0:
        return math.nan
    confidences = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    boundaries = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(boundaries, confidences, side="right") - 1  # in [0, n_bins]
    counts = np.bincount(bins, minlength=n_bins + 1).astype(np.float64)
    conf_sum = np.bincount(bins, weights=confidences, minlength=n_bins + 1)
    correct_sum = np.bincount(bins, weights=correct, minlength=n_bins + 1)
    occupied = counts > 0
    gaps = np.abs(correct_sum[occupied] - conf_sum[occupied]) / counts[occupied]
    return float(np.sum(gaps * counts[occupied]) / y.size)


def _accuracy_matrix(acc_matrix: ArrayLike, step: int | None) -> tuple[np.ndarray, int]:
    r = _numpy(acc_matrix)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"expected a square accuracy matrix [T, T], got shape {r.shape}")
    last = r.shape[0] - 1 if step is None else step
    if not 0 <= last < r.shape[0]:
        raise ValueError(f"step must be in [0, {r.shape[0]}), got {step}")
    return r, last


def forgetting(acc_matrix: ArrayLike, *, step: int | None = None) -> float:
    """Average forgetting, as Avalanche's ``StreamForgetting`` defines it.

    With ``R[i, j]`` the accuracy on experience ``j`` evaluated after training experience ``i``
    (experiences trained in order 0, 1, ..., T-1), Avalanche's ``ExperienceForgetting`` of
    experience ``j`` at step ``i`` is the accuracy recorded right after training on ``j`` minus
    the current one, ``R[j, j] - R[i, j]``, defined for the experiences trained *before* step
    ``i`` (``j < i``; the experience just trained has no "later" value yet). ``StreamForgetting``
    at step ``i`` is the mean over ``j < i``::

        forgetting_i = 1/i * sum_{j < i} (R[j, j] - R[i, j])

    Positive means accuracy was lost. Units are those of ``R``.

    Args:
        acc_matrix: ``[T, T]`` accuracy matrix, row = after training that experience.
        step: the row ``i`` to evaluate; default the last one (the end of the stream).

    Returns:
        The average forgetting; ``nan`` at step 0, where nothing can have been forgotten yet
        (Avalanche's empty ``Mean`` reports 0 there).
    """
    r, i = _accuracy_matrix(acc_matrix, step)
    if i == 0:
        return math.nan
    js = np.arange(i)
    return float(np.mean(r[js, js] - r[i, js]))


def backward_transfer(acc_matrix: ArrayLike, *, step: int | None = None) -> float:
    """Backward transfer, as Avalanche's ``StreamBWT`` defines it: the negative of :func:`forgetting`.

    With ``R`` as in :func:`forgetting`, ``BWT_i = 1/i * sum_{j < i} (R[i, j] - R[j, j])``; at the
    last step this is also the BWT of Lopez-Paz & Ranzato (2017). Negative means the later
    experiences hurt the earlier ones.

    Args:
        acc_matrix: ``[T, T]`` accuracy matrix, row = after training that experience.
        step: the row ``i`` to evaluate; default the last one.

    Returns:
        The backward transfer; ``nan`` at step 0.
    """
    value = forgetting(acc_matrix, step=step)
    return math.nan if math.isnan(value) else -value
