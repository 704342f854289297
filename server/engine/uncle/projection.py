"""Burn-in updates confined to directions the retained tasks do not use (gradient projection).

The paper's burn-in (eq. 3) keeps the other tasks in place with a penalty, ``λ_u · L_reg``, that
must be evaluated on their generated networks at every step: two thirds of a step's cost, and
still a soft constraint. Here the constraint is built into the update instead, as in gradient
projection methods for continual learning (GPM, Saha et al. 2021; OWM, Zeng et al. 2019):

Every layer of the hypernetwork's trunk is affine, ``y = [x; 1] M`` with ``M = [Wᵀ; b]``. If a
change ``ΔM`` satisfies ``[x; 1] ΔM = 0`` for every input row ``x`` the retained tasks' (task,
chunk) pairs feed that layer, none of their outputs changes, layer after layer. So each layer is
updated only as ``M + N A``, where the columns of ``N`` span the directions of the input space
that those rows leave (almost) empty: the eigenvectors of their Gram matrix ``Σ [x; 1]ᵀ [x; 1]``
whose eigenvalues together hold at most a fraction ``energy`` of its trace. Only ``A`` is trained.
By default the output layer is not: the closed-form refit that ends every burn-in
(``strategy._refit_head``) solves it anew, keeping the forgotten task's new output and restoring
the others'. Training it here too (``projected_output_layer``) cost 30% more unlearning time (the
largest eigendecomposition, 513 wide, and a third of each step) and on permuted digits bought 1-2
points of accuracy on tasks learned right after an unlearn.

Of those free directions only the ones the forgotten task's own rows use are trained (see
:func:`free_directions`), so the edit is the forgotten task's alone and does not also reach a
task learned later.

In the first layer the input is ``[e; c; 1]``: the forgotten embedding's component orthogonal to
the retained tasks' embeddings is a direction no retained row uses at all, so the forgotten
task's first-layer activations can be moved with no effect on the others while fewer than
``embedding_dim`` tasks are retained. Deeper layers offer the little-used directions of the
trunk's features. The retained tasks' networks still move slightly (by the ``energy`` left in
the freed directions, and at second order through the ReLUs); the output-layer refit that follows
every burn-in removes that drift where the rows fit. Where the refit does not run (a backbone
with more chunks than the output layer has inputs, or ``refit_head = false``), the trunk's edit
alone forgets.

A step then evaluates (part of) one network, the forgotten task's, instead of three.
"""

from __future__ import annotations

import torch
from torch import nn

from server.engine.uncle.hypernetwork import ChunkedHypernetwork

_TASK_BATCH = 32

#: Energy share below which a direction counts as empty whatever ``energy`` says (float64 rounding).
_ROUNDING = 1e-12

#: A free direction is trained when it holds at least this share of the forgotten task's largest energy there.
_USED = 0.05


def _affine(hypernetwork: ChunkedHypernetwork) -> list[torch.Tensor]:
    """Every layer as ``M = [Wᵀ; b]`` ``[in + 1, out]`` (the output layer with its gain folded in)."""
    matrices = []
    for layer in hypernetwork.trunk:
        assert isinstance(layer, nn.Linear)
        matrices.append(torch.cat([layer.weight.T, layer.bias[None]]))
    head = hypernetwork.head
    matrices.append(torch.cat([(head.weight * hypernetwork.head_gain).T, head.bias[None]]))
    return [m.detach().clone() for m in matrices]


def _with_one(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def _first_inputs(hypernetwork: ChunkedHypernetwork, embeddings: torch.Tensor) -> torch.Tensor:
    """The first layer's inputs ``[T·C, E + C_e]``: every (task, chunk) pair's ``[e; c]``."""
    tasks, chunks = embeddings.shape[0], hypernetwork.num_chunks
    chunk_embeddings = hypernetwork.chunk_embeddings.detach()
    return torch.cat(
        [
            embeddings[:, None, :].expand(tasks, chunks, -1),
            chunk_embeddings[None].expand(tasks, chunks, -1),
        ],
        dim=2,
    ).flatten(0, 1)


@torch.no_grad()
def free_directions(
    hypernetwork: ChunkedHypernetwork,
    retained: torch.Tensor,
    forgotten: torch.Tensor,
    energy: float,
    *,
    output_layer: bool = False,
) -> list[torch.Tensor]:
    """Per layer, an orthonormal basis ``[in + 1, r]`` of the input directions the forgotten task
    uses and the retained tasks leave free.

    First the directions holding at most a fraction ``energy`` of the retained rows' input energy
    are found (the smallest eigenvalues of their Gram matrix); then, within those, only the
    directions that carry a real share of the forgotten task's own rows are kept (eigenvalues of
    its Gram matrix there above :data:`_USED` of the largest). A free direction the forgotten
    task barely uses can only move its output through huge weights (Adam moves every coordinate by
    about one learning rate, useful or not), and those weights then land on the inputs of tasks
    learned later: with every free direction trainable, the output layer's norm grew eightfold over
    five unlearns and new tasks stopped learning (see ``tests/engine/test_uncle_projection.py``).

    Args:
        hypernetwork: φ as the previous operation left it.
        retained: embeddings ``[P, E]`` of the tasks that must keep their networks (may be empty).
        forgotten: the embedding ``[1, E]`` of the task being unlearned.
        energy: the fraction of the retained rows' input energy (the Gram matrix's trace) the
            freed directions may hold, per layer; 0 frees only the directions empty up to rounding.
        output_layer: also free directions of the output layer (by default its basis is empty:
            see the module docstring).

    Returns:
        One basis per layer: the trunk layers', then the output layer's.
    """
    matrices = _affine(hypernetwork)
    layers = matrices if output_layer else matrices[:-1]
    retained_grams = _input_grams(hypernetwork, layers, retained)
    forgotten_grams = _input_grams(hypernetwork, layers, forgotten)
    bases = []
    for kept, used in zip(retained_grams, forgotten_grams, strict=True):
        values, vectors = torch.linalg.eigh(kept)  # ascending
        total = float(values.sum())
        allowed = max(energy, _ROUNDING) * total
        free = vectors[:, values.clamp_min(0).cumsum(0) <= allowed] if total > 0 else vectors
        values, within = torch.linalg.eigh(free.T @ used @ free)
        top = float(values[-1]) if values.numel() else 0.0
        bases.append((free @ within[:, values > _USED * top]).float() if top > 0 else free[:, :0].float())
    if not output_layer:
        head = matrices[-1]
        bases.append(head.new_zeros(head.shape[0], 0))
    return bases


def _input_grams(
    hypernetwork: ChunkedHypernetwork, layers: list[torch.Tensor], embeddings: torch.Tensor
) -> list[torch.Tensor]:
    """Per layer of ``layers`` (the first ones of φ), ``Σ [x; 1]ᵀ [x; 1]`` (float64) over every
    (task, chunk) row of ``embeddings``."""
    grams = [torch.zeros(m.shape[0], m.shape[0], dtype=torch.float64, device=m.device) for m in layers]
    for part in torch.split(embeddings, _TASK_BATCH):
        x = _first_inputs(hypernetwork, part)
        for index, (matrix, gram) in enumerate(zip(layers, grams, strict=True)):
            rows = _with_one(x)
            gram += (rows.T @ rows).double()
            if index < len(layers) - 1:
                x = torch.relu(rows @ matrix)
    return grams


class ProjectedEdit(nn.Module):
    """φ plus trainable changes confined to the free directions (layer ``l`` is ``M_l + N_l A_l``),
    evaluated for one task: the one being unlearned.

    Args:
        hypernetwork: φ (not modified until :meth:`apply_to`).
        bases: :func:`free_directions` of the same φ.
        embedding: the task's embedding ``[1, E]`` (fixed).
    """

    def __init__(self, hypernetwork: ChunkedHypernetwork, bases: list[torch.Tensor], embedding: torch.Tensor) -> None:
        super().__init__()
        self._bases = bases
        self._matrices = _affine(hypernetwork)
        self.changes = nn.ParameterList(
            nn.Parameter(torch.zeros(n.shape[1], m.shape[1], device=m.device))
            for n, m in zip(bases, self._matrices, strict=True)
        )
        # The first layer's inputs never change: its fixed part and its free coordinates are
        # computed once, for every chunk.
        first = _with_one(_first_inputs(hypernetwork, embedding))  # [C, E + C_e + 1]
        self._first_fixed = first @ self._matrices[0]
        self._first_free = first @ bases[0]

    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        """The task's raw chunks ``[B, chunk_size]`` at chunk numbers ``chunks`` (long ``[B]``) under the edited φ."""
        x = self._first_fixed[chunks] + self._first_free[chunks] @ self.changes[0]
        for matrix, basis, change in zip(self._matrices[1:], self._bases[1:], self.changes[1:], strict=True):
            hidden = torch.relu(x)
            # [h; 1] (M + N A) without materializing [h; 1]: the last rows of M and N act on the 1.
            x = torch.addmm(matrix[-1], hidden, matrix[:-1])
            if basis.shape[1]:
                x = x + torch.addmm(basis[-1], hidden, basis[:-1]) @ change
        return x

    @torch.no_grad()
    def apply_to(self, hypernetwork: ChunkedHypernetwork) -> None:
        """Write ``M + N A`` into ``hypernetwork``'s layers (the output layer's gain stays as it is)."""
        layers = [*hypernetwork.trunk, hypernetwork.head]
        for layer, matrix, basis, change in zip(layers, self._matrices, self._bases, self.changes, strict=True):
            if not basis.shape[1]:
                continue  # nothing trainable: leave the layer bit for bit as it is
            edited = matrix + basis @ change
            scale = hypernetwork.head_gain if layer is hypernetwork.head else 1.0
            layer.weight.copy_(edited[:-1].T / scale)
            layer.bias.copy_(edited[-1])
