"""Small helpers shared by the strategies' explicit training loops.

Nothing here keeps state: seeds are derived from explicit parts, random draws use explicit
``torch.Generator`` objects, and the one helper that must use PyTorch's global RNG (module
construction) restores it afterwards.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from server.engine.protocol import LearnOptions, Progress, TaskData

_SEED_BITS = 63


def derive_seed(*parts: int | str) -> int:
    """Derive a stable 63-bit seed from ``parts`` (same parts → same seed, on every platform).

    Python's ``hash`` is salted per process, so a cryptographic hash of the parts' ``repr`` is used.
    """
    digest = hashlib.sha256(repr(tuple(parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - _SEED_BITS)


def seeded_generator(*parts: int | str) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*parts))
    return generator


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed PyTorch's global CPU RNG inside the block and restore its previous state afterwards.

    For code that draws from the global RNG and takes no generator, such as ``nn.Module``
    constructors. Not thread-safe: only the worker thread may use it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffle ``range(n)`` with ``generator`` and split it into index batches of ``batch_size``.

    A trailing batch of a single sample is merged into the previous one, because BatchNorm cannot
    train on one sample.

    Returns:
        int64 index tensors ``[<= batch_size + 1]`` on the CPU.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    order = torch.randperm(n, generator=generator)
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def count_minibatches(n: int, batch_size: int) -> int:
    """Number of batches :func:`minibatches` returns for ``n`` samples (without drawing anything)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    count = -(-n // batch_size)
    last = n - (count - 1) * batch_size
    return count - 1 if count > 1 and last == 1 else count


def linear_init_params(
    in_features: int, out_features: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``(weight [out, in], bias [out])`` exactly as ``nn.Linear.reset_parameters`` does.

    Uses ``generator`` only, so it is safe to call from any thread.
    """
    weight = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    bias = torch.empty(out_features)
    nn.init.uniform_(bias, -bound, bound, generator=generator)
    return weight, bias


def class_mask(classes: Iterable[int], num_classes: int, device: torch.device | None = None) -> torch.Tensor:
    """Return a bool mask ``[num_classes]`` that is True exactly at ``classes``."""
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    indices = list(classes)
    if indices:
        mask[torch.tensor(indices, dtype=torch.long, device=device)] = True
    return mask


def mask_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set logits ``[n, C]`` of classes outside ``mask`` ``[C]`` to ``-inf`` (out of place)."""
    return logits.masked_fill(~mask, float("-inf"))


# A serving pass is a handful of small tensor operations, and each one costs a dispatch and a release and
# re-acquisition of the interpreter lock even when it changes nothing; under load on the event loop that
# costs more than the arithmetic. The helpers below skip the operations that would change nothing.


def unseen_classes(mask: torch.Tensor) -> torch.Tensor | None:
    """The classes outside ``mask`` ``[C]`` (bool), or None when the mask holds every class; for :func:`mask_unseen`."""
    return None if bool(mask.all()) else ~mask


def mask_unseen(logits: torch.Tensor, unseen: torch.Tensor | None) -> torch.Tensor:
    """Set logits ``[n, C]`` of the ``unseen`` classes to ``-inf`` (out of place); ``logits`` itself when None."""
    return logits if unseen is None else logits.masked_fill(unseen, float("-inf"))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` (``x`` itself when it is there already)."""
    return x if x.device == device else x.to(device)


def cpu_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a CPU float32 tensor (``x`` itself when it is one already)."""
    return x if x.dtype == torch.float32 and x.device.type == "cpu" else x.to("cpu", torch.float32)


def check_learn_inputs(data: TaskData, options: LearnOptions, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Raise ``ValueError`` unless ``data`` and ``options`` fit a model of this shape.

    The server validates requests at the edge; this guards the model against direct callers.
    """
    if options.epochs < 1 or options.batch_size < 1 or not options.learning_rate > 0:
        raise ValueError(
            "epochs and batch_size must be >= 1 and learning_rate > 0, got "
            f"epochs={options.epochs}, batch_size={options.batch_size}, learning_rate={options.learning_rate}"
        )
    n = len(data)
    if n < 1:
        raise ValueError("cannot learn from zero samples")
    if tuple(data.inputs.shape) != (n, *input_shape):
        expected = ", ".join(map(str, input_shape))
        raise ValueError(f"inputs must have shape [n, {expected}], got {tuple(data.inputs.shape)}")
    if not data.inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point, got {data.inputs.dtype}")
    if not bool(torch.isfinite(data.inputs).all()):
        raise ValueError("inputs contain NaN or infinite values")
    if data.labels.dtype != torch.int64 or data.labels.dim() != 1:
        raise ValueError(f"labels must be int64 [n], got {data.labels.dtype} {tuple(data.labels.shape)}")
    low, high = int(data.labels.min()), int(data.labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{low}, {high}]")


def check_predict_inputs(inputs: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Validate predict inputs ``[n, *input_shape]`` and return them as float32.

    Raises:
        ValueError: for a non-tensor, a wrong shape or a non-floating dtype.
    """
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() != len(input_shape) + 1 or tuple(inputs.shape[1:]) != tuple(input_shape):
        raise ValueError(f"inputs must have shape [n, {', '.join(map(str, input_shape))}], got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point, got {inputs.dtype}")
    return inputs if inputs.dtype == torch.float32 else inputs.to(torch.float32)


def module_state_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """Return a CPU copy of ``module.state_dict()`` that shares no storage with the module."""
    return {key: value.detach().to("cpu", copy=True) for key, value in module.state_dict().items()}


def scaled_progress(progress: Progress, done: int, parts: int, prefix: str) -> Progress:
    """Map part ``done`` (0-based) of ``parts`` equal parts of a job onto the job's ``[0, 1]`` progress."""

    def report(fraction: float, message: str) -> None:
        progress(min(1.0, (done + fraction) / parts), f"{prefix}: {message}")

    return report


def linear_from_state(state: Mapping[str, torch.Tensor], device: torch.device) -> nn.Linear:
    """An ``nn.Linear`` on ``device`` holding ``state``, its shape taken from the weight (heads grow with a trunk)."""
    weight = state["weight"]
    module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state, device="meta")
    module.load_state_dict({k: v.to(device, copy=True) for k, v in state.items()}, assign=True)
    return module
