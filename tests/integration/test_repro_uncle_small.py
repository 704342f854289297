"""A scaled-down UnCLE reproduction (``benchmarks/repro_uncle.py``) in the default suite.

Four permuted-digits tasks, ``L0 L1 U0 L2 L3 U2``, one seed, few epochs, through the gRPC API of a
fresh in-process server: retained tasks stay learned, forgotten ones drop to chance and stay there,
and unlearning barely touches the other tasks. The thresholds are loose enough to be stable on a
loaded 2-core machine and tight enough to fail when learning, forgetting or the regularizer breaks
(without unlearning FA would be ~90; without the regularizer spill and RA collapse).
"""

from __future__ import annotations

import math

from benchmarks.repro_uncle import VARIANTS, Benchmark, per_seed, run_sequence

SEQUENCE = ("L0", "L1", "U0", "L2", "L3", "U2")


def test_small_uncle_reproduction_learns_forgets_and_does_not_relapse() -> None:
    benchmark = Benchmark("permuted", "permuted digits, 4 tasks", SEQUENCE, chance=10.0)
    uncle = next(v for v in VARIANTS if v.key == "uncle")
    run = run_sequence(benchmark, uncle, seed=0, epochs=3, extra_options={}, width=64)

    # One evaluation row per operation, covering every task learned so far.
    assert len(run.accuracies) == len(SEQUENCE)
    assert set(run.accuracies[-1]) == {"t0", "t1", "t2", "t3"}
    assert run.learned == ["t1", "t3"] and run.unlearned == ["t0", "t2"]

    summary = per_seed(run)
    assert summary["ra"] >= 85, run.accuracies[-1]  # 10 classes: chance is 10%
    assert summary["fa"] <= 25, run.accuracies[-1]
    assert summary["spill"] <= 5, run.spills  # percentage points summed over the other tasks
    assert summary["relapse"] <= 5, run.relapses
    # The server's own verdicts: every unlearn verified at its reference (first attempt or after more
    # burn-in), and the MIA indistinguishable from chance under its permutation null.
    assert len(run.verification) == 2
    assert all(c["forget_verified"] == 1.0 for c in run.verification), run.verification
    assert all(c["mia_known"] == 1.0 and c["mia_p_value"] > 0.01 for c in run.verification), run.verification
    assert all(a <= 25 for a in run.forget_accuracy_task), run.forget_accuracy_task

    # The server's relapse is |a_u − a_e| of the accuracy matrix.
    for name, relapse in zip(run.unlearned, run.relapses, strict=True):
        unlearn_row = SEQUENCE.index(f"U{name[1:]}")
        expected = abs(run.accuracies[unlearn_row][name] - run.accuracies[-1][name])
        assert math.isclose(relapse, expected, abs_tol=1e-6)
