"""The projected burn-in update (``server.engine.uncle.projection``) on a trained hypernetwork."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from server.engine.protocol import TaskData, no_progress
from server.engine.uncle import UncleStrategy
from server.engine.uncle.hypernetwork import ChunkedHypernetwork
from server.engine.uncle.projection import ProjectedEdit, _first_inputs, free_directions

from .test_uncle import OPTIONS, PERMUTED, QUICK, accuracy, build, permuted_digits


@functools.cache
def _trained() -> dict[str, object]:
    strategy = build(width=64)
    for task in PERMUTED[:3]:
        strategy.learn(task, permuted_digits()[task].train, QUICK, no_progress, {})
    return strategy.state_dict()


def _strategy() -> UncleStrategy:
    strategy = build(width=64)
    strategy.load_state_dict(_trained())  # type: ignore[arg-type]
    return strategy


def _embeddings(strategy: UncleStrategy) -> torch.Tensor:
    state = strategy.state_dict()
    return torch.stack([e for e in state["embeddings"]])


def _layer_inputs(hypernetwork: ChunkedHypernetwork, embeddings: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's input rows ``[x; 1]`` for ``embeddings``' (task, chunk) pairs."""
    x = _first_inputs(hypernetwork, embeddings)
    rows = []
    for layer in [*hypernetwork.trunk, None]:
        rows.append(torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1))
        if layer is not None:
            x = torch.relu(layer(x))
    return rows


@pytest.mark.parametrize("output_layer", [False, True])
def test_free_directions_hold_at_most_the_allowed_energy_of_the_retained_rows(output_layer: bool) -> None:
    strategy = _strategy()
    hypernetwork = strategy._hypernetwork
    embeddings = _embeddings(strategy)
    retained, forgotten = embeddings[[0, 2]], embeddings[1:2]
    for energy in (0.0, 1e-5, 1e-3):
        bases = free_directions(hypernetwork, retained, forgotten, energy, output_layer=output_layer)
        retained_rows, forgotten_rows = _layer_inputs(hypernetwork, retained), _layer_inputs(hypernetwork, forgotten)
        assert len(bases) == len(hypernetwork.trunk) + 1
        assert (bases[-1].shape[1] > 0) == output_layer, [b.shape for b in bases]  # 72 rows leave room in 513
        for index, (basis, rows) in enumerate(zip(bases, retained_rows, strict=True)):
            assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-4)  # orthonormal
            share = float((rows @ basis).square().sum() / rows.square().sum())
            assert share <= energy + 1e-6, (energy, index, share)
            if basis.shape[1]:  # and every kept direction carries a real share of the forgotten rows
                along = (forgotten_rows[index] @ basis).square().sum(0)
                assert float(along.min()) >= 0.04 * float(along.max()), (energy, index, along)
    # In the first layer the one free direction is the forgotten embedding's own: every forgotten
    # (task, chunk) row has the same nonzero coordinate on it, every retained row none.
    first = free_directions(hypernetwork, retained, forgotten, 0.0)[0]
    assert first.shape[1] == 1
    coordinates = _layer_inputs(hypernetwork, forgotten)[0] @ first
    assert float(coordinates.abs().min()) > 0.1
    assert torch.allclose(coordinates, coordinates[0].expand_as(coordinates), atol=1e-4)


def test_the_edit_generates_the_same_chunks_until_trained_and_writes_back_what_it_generates() -> None:
    strategy = _strategy()
    hypernetwork = strategy._hypernetwork
    embeddings = _embeddings(strategy)
    retained, forgotten = embeddings[[0, 2]], embeddings[1:2]
    bases = free_directions(hypernetwork, retained, forgotten, 1e-5, output_layer=True)
    edit = ProjectedEdit(hypernetwork, bases, forgotten)
    every = torch.arange(hypernetwork.num_chunks)
    with torch.no_grad():
        assert torch.allclose(edit(every), hypernetwork.all_chunks(forgotten)[0], atol=1e-4)
        before = hypernetwork.all_chunks(embeddings)
        generator = torch.Generator().manual_seed(0)
        for change in edit.changes:
            change.copy_(torch.randn(change.shape, generator=generator) * 0.1)
        edited = edit(every)
    edit.apply_to(hypernetwork)
    with torch.no_grad():
        after = hypernetwork.all_chunks(embeddings)
    assert torch.allclose(after[1], edited, atol=1e-3)
    forgotten_moved = float((after[1] - before[1]).norm() / before[1].norm())
    assert forgotten_moved >= 0.01, forgotten_moved  # the edit reaches the forgotten task...
    for row in (0, 2):  # ...and leaves the retained tasks in place
        moved = float((after[row] - before[row]).norm() / before[row].norm())
        assert moved <= forgotten_moved / 20, (row, moved, forgotten_moved)


def test_tasks_learned_after_many_projected_unlearns_still_learn() -> None:
    """The paper's permuted sequence with an aggressive burn-in (lr 0.02, a quarter of the chunks).

    Two causes of weak learning after unlearns, each fixed and held here:

    * Edits in free directions the forgotten task barely uses need huge weights to move its
      output (the output layer's norm grew 8x) and land on the inputs of tasks learned later:
      with every free direction trainable, tasks learned after the unlearns reached 67-84%.
    * The output-layer refit restored the unlearned tasks' noise-aligned networks exactly as
      well, spending the layer's unknowns on them: tasks learned after three unlearns reached
      83-92% (83.1% on an AMD EPYC with torch 2.15.0). Their rows now weigh 0.1 in the refit
      (``refit_unlearned_weight``): the lowest is 91.9% with this suite's one torch thread and
      95.3% with two (95-97% without any unlearn), and the unlearned tasks stay forgotten. The
      bound sits between the two: the last bits of BLAS change with the CPU and thread count.
    """
    strategy = build(width=100, burn_in_chunks=0.25, unlearn_learning_rate=0.02)
    base = permuted_digits()["perm.0"]

    def task(index: int) -> tuple[TaskData, TaskData]:
        pixels = torch.from_numpy(np.random.default_rng(200 + index).permutation(64))
        return tuple(  # type: ignore[return-value]
            TaskData(split.inputs.reshape(-1, 64)[:, pixels].reshape(-1, 1, 8, 8), split.labels)
            for split in (base.train, base.probe)
        )

    learned, probes, unlearned = {}, {}, []
    for operation in ["L1", "L0", "U1", "L5", "L8", "L9", "L7", "U0", "L2", "L3", "L4", "U8", "U3", "U5", "L6"]:
        name = f"t{operation[1:]}"
        if operation[0] == "U":
            strategy.unlearn(name, "", no_progress, {})
            assert accuracy(strategy, name, probes[name]) <= 25.0
            unlearned.append(name)
            continue
        train, probes[name] = task(int(operation[1:]))
        strategy.learn(name, train, OPTIONS, no_progress, {})
        learned[name] = accuracy(strategy, name, probes[name])
    assert min(learned.values()) >= 90.0, learned
    # Leaving them out of the refit does not revive the unlearned tasks (chance is 10%).
    assert max(accuracy(strategy, name, probes[name]) for name in unlearned) <= 25.0
