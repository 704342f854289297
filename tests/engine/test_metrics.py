"""Metrics against hand computations and reference implementations (torchmetrics, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from torchmetrics.classification import MulticlassCalibrationError

from server.engine import metrics


def test_accuracy() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [float("-inf"), 0.0]])
    assert metrics.accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(75.0)
    assert metrics.accuracy(logits.numpy(), [0, 1, 1, 1]) == pytest.approx(75.0)
    assert math.isnan(metrics.accuracy(np.zeros((0, 3)), []))
    with pytest.raises(ValueError):
        metrics.accuracy(np.zeros((2, 3)), [0])


def test_retain_and_forget_accuracy() -> None:
    assert metrics.retain_accuracy({"a": 90.0, "b": 70.0}) == pytest.approx(80.0)
    assert metrics.forget_accuracy({"f": 10.0, "g": math.nan}) == pytest.approx(10.0)
    assert math.isnan(metrics.retain_accuracy({}))
    assert math.isnan(metrics.forget_accuracy({"f": math.nan}))


def test_spill_by_hand() -> None:
    before = {"f": 95.0, "a": 90.0, "b": 80.0, "gone": 50.0, "noprobe": 60.0}
    after = {"f": 12.0, "a": 85.0, "b": 82.0, "gone": 10.0}
    # |90 - 85| + |80 - 82|; f is the forgotten task, "gone" was not LEARNED, "noprobe" has no row after.
    assert metrics.spill(before, after, "f", ["f", "a", "b", "noprobe", "a"]) == pytest.approx(7.0)
    assert metrics.spill(before, after, "f", ["f"]) == 0.0
    assert metrics.spill({"a": math.nan}, {"a": 3.0}, "f", ["a"]) == 0.0


def test_relapse_by_hand() -> None:
    assert metrics.relapse(20.0, 35.5) == pytest.approx(15.5)
    assert metrics.relapse(35.5, 20.0) == pytest.approx(15.5)
    assert math.isnan(metrics.relapse(20.0, math.nan))


def _uni_reference(probs: np.ndarray) -> float:
    mean = probs.mean(axis=0)
    uniform = np.full(mean.size, 1.0 / mean.size)
    return 100.0 * (1.0 - jensenshannon(mean, uniform, base=2) ** 2)  # scipy returns sqrt(JS)


def test_uni_uniform_and_one_hot() -> None:
    assert metrics.uni(np.full((50, 10), 0.1)) == pytest.approx(100.0)
    one_hot = np.zeros((50, 10))
    one_hot[:, 3] = 1.0
    # JS(one-hot, uniform) over 10 classes, by hand: m = (0.55, 0.05 x 9);
    # KL(p||m) = log2(1/0.55); KL(u||m) = 0.1 log2(0.1/0.55) + 0.9 log2(0.1/0.05).
    js = 0.5 * math.log2(1 / 0.55) + 0.5 * (0.1 * math.log2(0.1 / 0.55) + 0.9 * math.log2(2.0))
    assert metrics.uni(one_hot) == pytest.approx(100 * (1 - js))
    assert metrics.uni(one_hot) < 30.0
    # Defined on the *mean* prediction: confident predictions spread evenly are uniform on average.
    assert metrics.uni(np.eye(10)) == pytest.approx(100.0)
    assert math.isnan(metrics.uni(np.zeros((0, 10))))


def test_uni_matches_scipy_jensen_shannon() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        probs = torch.softmax(torch.tensor(rng.normal(size=(40, 6)) * 3), dim=1).numpy()
        assert metrics.uni(probs) == pytest.approx(_uni_reference(probs), abs=1e-9)


def test_per_sample_loss() -> None:
    logits = torch.tensor([[2.0, 0.0, float("-inf")], [0.0, 0.0, float("-inf")], [0.0, float("-inf"), 1.0]])
    labels = torch.tensor([0, 1, 1])
    loss = metrics.per_sample_loss(logits, labels)
    assert loss.dtype == np.float64 and loss.shape == (3,)
    assert loss[0] == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))
    assert loss[1] == pytest.approx(math.log(2))
    assert loss[2] == math.inf


def test_mia_on_identical_distributions_is_chance() -> None:
    rng = np.random.default_rng(0)
    score = metrics.mia(rng.exponential(1.0, 400), rng.exponential(1.0, 400))
    assert 40.0 <= score <= 60.0


def test_mia_balances_unequal_sets() -> None:
    # Without subsampling, "always member" would score 1000 / 1050 = 95%.
    rng = np.random.default_rng(0)
    score = metrics.mia(rng.exponential(1.0, 1000), rng.exponential(1.0, 50))
    assert 35.0 <= score <= 65.0


def test_mia_on_separated_distributions_is_high() -> None:
    rng = np.random.default_rng(0)
    members = rng.exponential(0.05, 300)  # memorized: tiny training loss
    nonmembers = rng.exponential(1.0, 300) + 0.5
    assert metrics.mia(members, nonmembers) > 95.0
    infinite = np.concatenate([nonmembers[:-5], np.full(5, np.inf)])  # masked true class: loss inf
    assert metrics.mia(members, infinite) > 95.0


def test_mia_is_deterministic_and_needs_enough_samples() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 100), rng.normal(1.5, 1.0, 80)
    assert metrics.mia(a, b, seed=7) == metrics.mia(a, b, seed=7)
    assert math.isnan(metrics.mia(a[:4], b))
    assert math.isnan(metrics.mia(a, b[:2], folds=3))
    assert not math.isnan(metrics.mia(a[:3], b[:3], folds=3))
    with pytest.raises(ValueError):
        metrics.mia(a, b, folds=1)


@pytest.mark.parametrize("seed", range(6))
def test_ece_matches_torchmetrics(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    num_classes = 2 + seed
    temperature = 0.3 + seed
    probs = torch.softmax(torch.randn(500, num_classes, generator=generator) * temperature, dim=1)
    labels = torch.randint(0, num_classes, (500,), generator=generator)
    if seed % 2:  # include exact one-hot rows: torchmetrics gives confidence 1.0 a bin of its own
        probs[:50] = torch.nn.functional.one_hot(labels[:50], num_classes).float()
        probs[50:60] = torch.nn.functional.one_hot((labels[50:60] + 1) % num_classes, num_classes).float()
    reference = MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1")
    expected = reference(probs, labels).item()
    assert metrics.expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(expected, abs=1e-6)
    assert metrics.expected_calibration_error(probs.numpy(), labels.numpy()) == pytest.approx(expected, abs=1e-6)


def test_ece_gives_confidence_one_a_bin_of_its_own_like_torchmetrics() -> None:
    # 10 correct at confidence 0.95 and 10 wrong one-hot rows: bins [14/15, 1) and {1.0} give
    # 0.5 * |1 - 0.95| + 0.5 * |0 - 1| = 0.525; one merged last bin would give |0.5 - 0.975| = 0.475.
    probs = torch.tensor([[0.95, 0.05]] * 10 + [[1.0, 0.0]] * 10)
    labels = torch.tensor([0] * 10 + [1] * 10)
    expected = MulticlassCalibrationError(num_classes=2, n_bins=15, norm="l1")(probs, labels).item()
    assert expected == pytest.approx(0.525, abs=1e-6)
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)


def test_ece_by_hand() -> None:
    # Two samples at confidence 0.9 (one right), one at 0.6 (right): (2/3)|0.5 - 0.9| + (1/3)|1 - 0.6|.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = np.array([0, 1, 1])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.4)
    assert math.isnan(metrics.expected_calibration_error(np.zeros((0, 2)), []))


R = np.array(
    [
        [90.0, 10.0, 5.0],
        [70.0, 85.0, 8.0],
        [60.0, 75.0, 95.0],
    ]
)


def test_forgetting_and_bwt_by_hand() -> None:
    # End of stream: ((90 - 60) + (85 - 75)) / 2 = 20; after step 1: (90 - 70) / 1 = 20.
    assert metrics.forgetting(R) == pytest.approx(20.0)
    assert metrics.backward_transfer(R) == pytest.approx(-20.0)
    assert metrics.forgetting(R, step=1) == pytest.approx(20.0)
    assert math.isnan(metrics.forgetting(R, step=0))
    assert math.isnan(metrics.backward_transfer(R[:1, :1]))
    with pytest.raises(ValueError):
        metrics.forgetting(R[:2])


def _avalanche_like_stream_forgetting(matrix: np.ndarray, step: int) -> float:
    """Replays Avalanche's bookkeeping: 'initial' when the evaluated experience was just trained,
    'last' otherwise (reset every evaluation); the mean over keys having both."""
    initial: dict[int, float] = {}
    last: dict[int, float] = {}
    for trained in range(step + 1):
        last = {}
        for evaluated in range(matrix.shape[1]):
            if evaluated == trained:
                initial[evaluated] = float(matrix[trained, evaluated])
            else:
                last[evaluated] = float(matrix[trained, evaluated])
    values = [initial[k] - last[k] for k in initial if k in last]
    return sum(values) / len(values) if values else math.nan


def test_forgetting_matches_avalanche_bookkeeping_on_random_matrices() -> None:
    rng = np.random.default_rng(0)
    for size in (2, 3, 5, 8):
        matrix = rng.uniform(0, 100, (size, size))
        for step in range(1, size):
            expected = _avalanche_like_stream_forgetting(matrix, step)
            assert metrics.forgetting(matrix, step=step) == pytest.approx(expected)
            assert metrics.backward_transfer(matrix, step=step) == pytest.approx(-expected)


# ---------------------------------------------------------------- verified forgetting


def _one_hot_logits(predicted: np.ndarray, classes: int) -> np.ndarray:
    logits = np.full((predicted.size, classes), -np.inf)
    logits[np.arange(predicted.size), predicted] = 1.0
    return logits


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(5))
def test_balanced_accuracy_matches_sklearn(seed: int) -> None:
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(seed)
    labels = rng.choice([1, 4, 7], size=90, p=[0.6, 0.3, 0.1])
    logits = rng.normal(size=(90, 10))
    expected = 100.0 * balanced_accuracy_score(labels, logits.argmax(axis=1))
    assert metrics.balanced_accuracy(logits, labels) == pytest.approx(expected, abs=1e-12)


def test_balanced_accuracy_of_a_constant_answer_is_chance_whatever_the_shares() -> None:
    labels = np.array([0] * 17 + [1] * 9)  # raw accuracy of "always 0" would be 65.4
    logits = _one_hot_logits(np.zeros(26, dtype=np.int64), 2)
    assert metrics.accuracy(logits, labels) == pytest.approx(100 * 17 / 26)
    assert metrics.balanced_accuracy(logits, labels) == 50.0
    assert math.isnan(metrics.balanced_accuracy(np.zeros((0, 2)), np.zeros(0)))


def _wilson_by_hand(x: int, n: int) -> tuple[float, float]:
    # Wilson (1927), written out independently: center ± half-width, z = Φ⁻¹(0.975).
    z = 1.959963984540054
    phat = x / n
    lo = (phat + z**2 / (2 * n) - z * math.sqrt((phat * (1 - phat) + z**2 / (4 * n)) / n)) / (1 + z**2 / n)
    hi = (phat + z**2 / (2 * n) + z * math.sqrt((phat * (1 - phat) + z**2 / (4 * n)) / n)) / (1 + z**2 / n)
    return 100 * lo, 100 * hi


@pytest.mark.parametrize(("x", "n"), [(19, 36), (0, 36), (36, 36), (18, 36), (130, 200), (1, 2)])
def test_wilson_interval_matches_the_formula(x: int, n: int) -> None:
    low, high = metrics.wilson_interval(x, n)
    assert (low, high) == pytest.approx(_wilson_by_hand(x, n), abs=1e-9)
    assert 0.0 <= low <= 100 * x / n <= high <= 100.0


def test_wilson_interval_known_values() -> None:
    # 19 of 36 (52.8%): the ±16-point interval of the README tour's probe.
    low, high = metrics.wilson_interval(19, 36)
    assert round(low, 1) == 37.0 and round(high, 1) == 68.0
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))


def test_balanced_accuracy_interval_is_wilson_with_the_sample_size() -> None:
    assert metrics.balanced_accuracy_interval(50.0, 36) == pytest.approx(metrics.wilson_interval(18, 36))
    assert all(math.isnan(v) for v in metrics.balanced_accuracy_interval(math.nan, 36))


def test_mia_null_of_a_random_loss_attack_is_not_significant() -> None:
    p_values = []
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        result = metrics.mia_with_null(rng.exponential(1.0, 36), rng.exponential(1.0, 36), seed=seed)
        assert result.known and result.members == result.nonmembers == 36
        assert result.null_low < 50.0 < result.null_high
        assert result.null_high - result.null_low > 10.0  # 36+36 samples: a wide interval, not a point
        p_values.append(result.p_value)
    # Under the null the p-value is uniform: none of ten is tiny, and they are spread.
    assert min(p_values) > 0.01 and float(np.median(p_values)) > 0.2, p_values


def test_mia_null_of_a_separable_attack_is_significant() -> None:
    rng = np.random.default_rng(0)
    result = metrics.mia_with_null(rng.exponential(0.01, 36), rng.exponential(1.0, 36) + 0.5, permutations=200)
    assert result.score == 100.0 and result.score > result.null_high
    assert result.p_value == pytest.approx(1 / 201)


def test_mia_null_uses_the_same_attack_as_mia() -> None:
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(4)
    for seed in range(10):
        members, nonmembers = rng.exponential(rng.uniform(0.1, 1.0), 50), rng.exponential(1.0, 61)
        features, targets = metrics._attack_data(members, nonmembers, seed)  # type: ignore[misc]
        splits = [[t for _, t in StratifiedKFold(5, shuffle=True, random_state=seed).split(features, targets)]]
        fast = metrics._fold_scores(features[:, 0], targets[None], splits, c=1.0)[0]
        assert fast == pytest.approx(metrics.mia(members, nonmembers, seed=seed), abs=1e-9)


def test_mia_with_too_few_samples_is_unknown() -> None:
    rng = np.random.default_rng(0)
    few = metrics.mia_with_null(rng.exponential(1.0, 12), rng.exponential(1.0, 12))
    assert not few.known and math.isnan(few.score) and (few.members, few.nonmembers) == (12, 12)
    edge = metrics.MIA_MIN_SAMPLES
    assert metrics.mia_with_null(rng.exponential(1.0, edge), rng.exponential(1.0, 40)).known
    assert not metrics.mia_with_null(rng.exponential(1.0, edge - 1), rng.exponential(1.0, 40)).known
    a, b = rng.exponential(1.0, 30), rng.exponential(1.0, 30)
    assert metrics.mia_with_null(a, b, seed=3) == metrics.mia_with_null(a, b, seed=3)
