"""The chunked hypernetwork of UnCLE: H(e_t, c_i; φ) → chunk i of task t's backbone parameters.

Two pieces:

* :class:`TargetLayout` describes the generated (target) network: the name, shape and position of
  every parameter tensor of the backbone in one flat vector, and a fixed per-tensor affine map
  ``θ = offset + scale · raw`` from the hypernetwork's raw output to parameter values.
* :class:`ChunkedHypernetwork` holds φ: an MLP trunk, a linear output layer producing
  ``chunk_size`` values, and one trainable chunk embedding per chunk. Task embeddings are *inputs*
  (the strategy owns them), so the same module generates any task's network and a frozen copy of
  it is a complete snapshot φ*.

The raw output is concatenated chunk after chunk and cut into tensors in each tensor's own
row-major layout, so element ``k`` of a tensor is always raw element ``start + k`` — there is no
reshape of a chunk into a differently shaped block (the authors' code reshaped without transposing,
which scrambled the per-layer initialization).

**Hyperfan-in initialization** (Chang, Flokas & Lipson, ICLR 2020). For a target weight with fan-in
``d_j`` generated from the last trunk features ``h`` (width ``d_k``) by an output layer ``W``,
``Var(θ) = Var(W) · d_k · E[h²]``; hyperfan-in picks ``Var(W) = 2 / (d_j · d_k · E[h²])`` so that
``Var(θ) = 2 / d_j`` (Kaiming). A single output layer is shared by all chunks, and chunks of
different layers need different variances, so the per-layer factor ``√(2 / d_j)`` is the fixed
``scale`` of :class:`TargetLayout`, and the output layer produces raw values of zero mean and unit
variance: its effective weight is ``gain · W`` with ``W ~ N(0, 1)`` and ``gain² = 1 / E‖h − h̄‖²``,
its bias ``−gain · W h̄``, where ``h̄`` is the mean trunk feature over all chunks and a few task
embeddings drawn from the embeddings' init distribution. The product is exactly the hyperfan-in
variance. Centering removes the component all chunks share (ReLU features have a positive mean),
which would otherwise start neighbouring chunks strongly correlated. Keeping ``W`` at unit scale
with a constant ``gain`` (an equalized learning rate) matters for Adam, see
:class:`ChunkedHypernetwork`.

A consequence used by the strategy: in raw space the standard normal N(0, I) *is* the Kaiming
initialization, so the paper's "align the forget task's parameters with N(0, I)" returns the task
to a freshly initialized network, whatever the layer widths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn

#: Module types whose 1-D ``weight``/``bias`` are a normalization's gain and shift.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)
#: Task embeddings are drawn from N(0, 1) (see :func:`init_task_embedding`).
EMBEDDING_STD = 1.0
#: Chunk embeddings are drawn from N(0, CHUNK_EMBEDDING_STD²). Larger than the task embeddings'
#: spread so that the chunk, not the shared task embedding, dominates the trunk's input: chunks
#: then start nearly uncorrelated (mean correlation ~0.1 instead of ~0.4 at equal spreads), which
#: made the first task on digits train markedly faster.
CHUNK_EMBEDDING_STD = 2.0
#: Reference task embeddings used to centre and normalize the output layer at init.
_INIT_REFERENCE_EMBEDDINGS = 8


@dataclass(frozen=True)
class ParameterSlice:
    """Where one backbone parameter lives in the flat generated vector and how it is scaled.

    Attributes:
        name: the parameter's name in ``backbone.named_parameters()``.
        shape: its shape.
        start: index of its first element in the flat vector.
        numel: number of elements.
        role: ``weight`` (2-D or more), ``bias`` (of a weight layer), ``norm_weight``,
            ``norm_bias`` or ``other``.
        fan_in: fan-in of the layer for ``weight`` and ``bias``, else 0.
        scale: the generated value is ``offset + scale · raw``.
        offset: see ``scale``.
    """

    name: str
    shape: tuple[int, ...]
    start: int
    numel: int
    role: str
    fan_in: int
    scale: float
    offset: float

    @property
    def stop(self) -> int:
        """One past the index of the last element."""
        return self.start + self.numel


class TargetLayout:
    """The generated network's parameters as one flat vector and the map from raw outputs.

    Build it with :meth:`from_module`. With raw outputs ~ N(0, 1) the generated network is
    initialized as follows: weights Kaiming-normal (variance ``2 / fan_in``), their biases with
    PyTorch's default variance ``1 / (3 · fan_in)``, normalization gains ``1 ± norm_scale`` and
    shifts ``0 ± norm_scale``; any other parameter gets the mean and standard deviation of the
    backbone's own initial values.

    Args:
        slices: one :class:`ParameterSlice` per parameter, contiguous and in order.
    """

    def __init__(self, slices: Sequence[ParameterSlice]) -> None:
        position = 0
        for item in slices:
            if item.start != position or item.numel != math.prod(item.shape):
                raise ValueError(f"slice {item.name!r} is not contiguous with the previous one or has a wrong size")
            position = item.stop
        self.slices: tuple[ParameterSlice, ...] = tuple(slices)
        self.numel: int = position

    @classmethod
    def from_module(cls, module: nn.Module, *, norm_scale: float = 0.1) -> TargetLayout:
        """Describe every parameter of ``module`` in ``named_parameters()`` order.

        Args:
            module: the backbone whose parameters will be generated.
            norm_scale: standard deviation of generated normalization gains and shifts.
        """
        named = dict(module.named_parameters())
        slices: list[ParameterSlice] = []
        start = 0
        for name, parameter in named.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            role, fan_in, scale, offset = _init_rule(owner, leaf, parameter, norm_scale)
            slices.append(
                ParameterSlice(
                    name=name,
                    shape=tuple(parameter.shape),
                    start=start,
                    numel=parameter.numel(),
                    role=role,
                    fan_in=fan_in,
                    scale=scale,
                    offset=offset,
                )
            )
            start += parameter.numel()
        if not slices:
            raise ValueError(f"{type(module).__name__} has no parameters to generate")
        return cls(slices)

    def unflatten(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map one raw vector ``[numel]`` to the backbone's parameters, name → tensor.

        Each tensor is a view of consecutive raw elements in its own row-major layout, then
        ``offset + scale · raw``.
        """
        if raw.dim() != 1 or raw.shape[0] != self.numel:
            raise ValueError(f"expected a raw vector of shape [{self.numel}], got {tuple(raw.shape)}")
        result: dict[str, torch.Tensor] = {}
        for item in self.slices:
            values = raw[item.start : item.stop].view(item.shape) * item.scale
            result[item.name] = values + item.offset if item.offset else values
        return result

    def flatten(self, parameters: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten`: map parameter values back to the raw vector ``[numel]``."""
        parts = [((parameters[item.name] - item.offset) / item.scale).reshape(-1) for item in self.slices]
        return torch.cat(parts)


def _init_rule(
    owner: nn.Module, leaf: str, parameter: torch.Tensor, norm_scale: float
) -> tuple[str, int, float, float]:
    """Return ``(role, fan_in, scale, offset)`` for one parameter (see :class:`TargetLayout`)."""
    if isinstance(owner, _NORM_TYPES) and leaf in ("weight", "bias"):
        return ("norm_weight", 0, norm_scale, 1.0) if leaf == "weight" else ("norm_bias", 0, norm_scale, 0.0)
    if parameter.dim() >= 2:
        fan_in = parameter[0].numel()
        return "weight", fan_in, math.sqrt(2.0 / fan_in), 0.0
    weight = getattr(owner, "weight", None)
    if leaf == "bias" and isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        fan_in = weight[0].numel()
        return "bias", fan_in, math.sqrt(1.0 / (3.0 * fan_in)), 0.0
    values = parameter.detach().float()
    std = float(values.std()) if values.numel() > 1 else 0.0
    return "other", 0, std if std > 0 else norm_scale, float(values.mean())


def auto_chunk_size(target_numel: int, input_dim: int, hidden: Sequence[int], chunk_embedding_dim: int) -> int:
    """A chunk size that keeps the hypernetwork both small and cheap to run.

    Size: the output layer costs ``hidden[-1] · chunk_size`` parameters and the chunk embeddings
    ``chunk_embedding_dim · ⌈numel / chunk_size⌉``; the sum is smallest at
    ``√(chunk_embedding_dim · numel / hidden[-1])``. Time: generating a network costs
    ``numel · (trunk / chunk_size + hidden[-1])`` multiply-adds, where ``trunk`` is the trunk's
    multiply-adds per chunk; below ``trunk / hidden[-1]`` the trunk dominates. The larger of the
    two, rounded to a power of two (at least 8), is returned.

    Args:
        target_numel: parameters of the generated network.
        input_dim: trunk input size (task plus chunk embedding sizes).
        hidden: trunk widths.
        chunk_embedding_dim: chunk embedding size.
    """
    if target_numel < 1 or input_dim < 1 or chunk_embedding_dim < 1 or not hidden or min(hidden) < 1:
        raise ValueError("target_numel, input_dim, chunk_embedding_dim and hidden widths must be positive")
    smallest = math.sqrt(chunk_embedding_dim * target_numel / hidden[-1])
    trunk = sum(a * b for a, b in pairwise([input_dim, *hidden]))
    cheapest = trunk / hidden[-1]
    return max(8, 2 ** round(math.log2(max(smallest, cheapest, 1.0))))


def init_task_embedding(dim: int, generator: torch.Generator) -> torch.Tensor:
    """Draw a new task embedding ``[dim]`` from N(0, EMBEDDING_STD²) on the CPU."""
    return torch.randn(dim, generator=generator) * EMBEDDING_STD


class ChunkedHypernetwork(nn.Module):
    """H(e, c_i; φ): the raw parameters of a backbone, generated chunk by chunk.

    φ is the trunk, the output layer and the chunk embeddings; all are ``nn.Parameter``s and
    all are trained (the authors' code never trained the chunk embeddings).

    Args:
        layout: the generated network.
        embedding_dim: task embedding size.
        chunk_embedding_dim: chunk embedding size.
        hidden: trunk widths, at least one layer (the paper: 128, 256, 512).
        chunk_size: raw values per chunk; 0 picks :func:`auto_chunk_size`.
        generator: CPU generator for every initial value (deterministic construction).
    """

    def __init__(
        self,
        layout: TargetLayout,
        *,
        embedding_dim: int = 32,
        chunk_embedding_dim: int = 32,
        hidden: Sequence[int] = (128, 256, 512),
        chunk_size: int = 0,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        if embedding_dim < 1 or chunk_embedding_dim < 1:
            raise ValueError("embedding_dim and chunk_embedding_dim must be positive")
        if not hidden or any(width < 1 for width in hidden):
            raise ValueError(f"hidden must list at least one positive width, got {tuple(hidden)!r}")
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = automatic), got {chunk_size}")
        self.layout = layout
        self.embedding_dim = embedding_dim
        self.chunk_size = chunk_size or auto_chunk_size(
            layout.numel, embedding_dim + chunk_embedding_dim, hidden, chunk_embedding_dim
        )
        self.num_chunks = math.ceil(layout.numel / self.chunk_size)
        self.chunk_embeddings = nn.Parameter(
            torch.randn(self.num_chunks, chunk_embedding_dim, generator=generator) * CHUNK_EMBEDDING_STD
        )
        widths = [embedding_dim + chunk_embedding_dim, *hidden]
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        self.head = nn.Linear(hidden[-1], self.chunk_size)
        # The output layer's weights are stored with unit variance and multiplied by this
        # constant in forward (an "equalized learning rate", Karras et al. 2018): the initial
        # output is the hyperfan-in one, but an Adam step — about lr per weight whatever its
        # scale — then changes the raw output by about lr·√d_k instead of lr·d_k·E|h|, which
        # is ~20x too large for lr = 1e-3 and makes training collapse.
        self.head_gain: torch.Tensor
        self.register_buffer("head_gain", torch.ones(()))
        self._hyperfan_in(generator)

    @torch.no_grad()
    def _hyperfan_in(self, generator: torch.Generator) -> None:
        """Kaiming trunk, then an output layer whose raw outputs have mean 0 and variance 1."""
        for layer in self.trunk:
            assert isinstance(layer, nn.Linear)
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
            nn.init.zeros_(layer.bias)
        references = torch.randn(_INIT_REFERENCE_EMBEDDINGS, self.embedding_dim, generator=generator) * EMBEDDING_STD
        total = torch.zeros(self.head.in_features, dtype=torch.float64)
        total_square = torch.zeros((), dtype=torch.float64)
        for embedding in references:
            features = self.features(embedding[None])[0].double()  # [num_chunks, last_hidden]
            total += features.sum(0)
            total_square += features.square().sum()
        count = references.shape[0] * self.num_chunks
        mean = total / count
        # E‖h − h̄‖² = E‖h‖² − ‖h̄‖².
        spread = max(float(total_square / count - mean.square().sum()), 1e-12)
        self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator))
        self.head_gain.fill_(1.0 / math.sqrt(spread))
        self.head.bias.copy_(-(self.head_gain.double() * (self.head.weight.double() @ mean)).float())

    def features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Last trunk features ``[T, num_chunks, hidden[-1]]`` for task embeddings ``[T, E]``."""
        task_part, chunk_part = self._first_layer(embeddings, self.chunk_embeddings)
        return self._trunk_rest(task_part[:, None, :] + chunk_part[None, :, :])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Raw generated vectors ``[T, layout.numel]`` for task embeddings ``[T, embedding_dim]``."""
        chunks = self.all_chunks(embeddings)  # [T, num_chunks, chunk_size]
        return chunks.reshape(embeddings.shape[0], self.num_chunks * self.chunk_size)[:, : self.layout.numel]

    def all_chunks(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Every chunk ``[T, num_chunks, chunk_size]`` for task embeddings ``[T, E]``.

        The last chunk is padded past ``layout.numel`` (see :meth:`valid_mask`).
        """
        self._check_embeddings(embeddings)
        return self._head(self.features(embeddings))

    def chunks(self, embeddings: torch.Tensor, tasks: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        """Selected chunks ``[B, chunk_size]``: chunk ``chunks[b]`` of task embedding ``embeddings[tasks[b]]``.

        The same function as :meth:`forward`, evaluated only at B (task, chunk) pairs, so a
        regularizer can sample pairs and pay for B chunks instead of whole networks.

        Args:
            embeddings: task embeddings ``[T, E]``.
            tasks: long ``[B]``, rows of ``embeddings``.
            chunks: long ``[B]``, chunk numbers in ``[0, num_chunks)``.
        """
        self._check_embeddings(embeddings)
        # index_select, not advanced indexing: the backward of ``x[index]`` accumulates repeated
        # rows with parallel atomic adds on the CPU, so its float sums (and every later step)
        # depend on thread scheduling; index_select's backward (index_add) is deterministic.
        task_part, chunk_part = self._first_layer(embeddings, self.chunk_embeddings.index_select(0, chunks))
        return self._head(self._trunk_rest(task_part.index_select(0, tasks) + chunk_part))

    def _first_layer(
        self, embeddings: torch.Tensor, chunk_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first trunk layer split in two: ``W [e; c] + b = W_e e + (W_c c + b)``, each part
        computed once per task and once per chunk (``[T, h0]``, ``[C, h0]``), summed by the caller."""
        first = self.trunk[0]
        assert isinstance(first, nn.Linear)
        task_part = F.linear(embeddings, first.weight[:, : self.embedding_dim])
        chunk_part = F.linear(chunk_embeddings, first.weight[:, self.embedding_dim :], first.bias)
        return task_part, chunk_part

    def _trunk_rest(self, first: torch.Tensor) -> torch.Tensor:
        """The trunk after its first layer's pre-activation ``first``: ReLU, then the other layers."""
        hidden = torch.relu(first)
        for layer in self.trunk[1:]:
            hidden = torch.relu(layer(hidden))
        return hidden

    def valid_mask(self) -> torch.Tensor:
        """Float ``[num_chunks, chunk_size]``: 1 where a chunk value is part of the network, 0 in the padding."""
        positions = torch.arange(self.num_chunks * self.chunk_size, device=self.chunk_embeddings.device)
        return (positions < self.layout.numel).to(self.chunk_embeddings.dtype).view(self.num_chunks, self.chunk_size)

    def _head(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.head.weight * self.head_gain, self.head.bias)

    def _check_embeddings(self, embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"expected embeddings [T, {self.embedding_dim}], got {tuple(embeddings.shape)}")

    def generate(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone parameters (name → tensor) for one task embedding ``[embedding_dim]``."""
        return self.layout.unflatten(self(embedding[None])[0])

    def parameter_count(self) -> int:
        """Number of trainable values of φ (trunk, output layer, chunk embeddings)."""
        return sum(p.numel() for p in self.parameters())
