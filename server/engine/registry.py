"""Strategy names → builder functions, and device resolution.

A builder is a function with keyword-only arguments: the fixed ones every builder takes
(``backbone``, ``input_shape``, ``num_classes``, ``device``, ``seed``) plus its own options,
each with a default. :func:`build_strategy` checks configured options against the builder's
signature, so a typo in a config file is an error that names the allowed options.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from server.engine.agscl import build_agscl
from server.engine.finetune import build_finetune
from server.engine.lure import build_lure
from server.engine.protocol import Strategy
from server.engine.uncle import build_uncle

#: Every strategy the server can run. To add one, add a line ``"name": build_name,``.
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "agscl": build_agscl,
    "finetune": build_finetune,
    "lure": build_lure,
    "uncle": build_uncle,
}

#: Arguments :func:`build_strategy` passes to every builder; not settable as options.
FIXED_ARGUMENTS: tuple[str, ...] = ("backbone", "input_shape", "num_classes", "device", "seed")

_CUDA_SPEC = re.compile(r"cuda(?::(\d+))?")


def strategy_options(name: str, *, registry: Mapping[str, Callable[..., Strategy]] | None = None) -> dict[str, Any]:
    """Return the options strategy ``name`` accepts, with their defaults.

    Raises:
        ValueError: if ``name`` is not a registered strategy.
    """
    builder = _builder(name, STRATEGIES if registry is None else registry)
    return {
        parameter.name: parameter.default
        for parameter in inspect.signature(builder).parameters.values()
        if parameter.name not in FIXED_ARGUMENTS
        and parameter.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def build_strategy(
    name: str,
    *,
    backbone: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    seed: int,
    options: Mapping[str, Any],
    registry: Mapping[str, Callable[..., Strategy]] | None = None,
) -> Strategy:
    """Build strategy ``name``, passing ``options`` to its builder as keyword arguments.

    Args:
        name: a key of ``registry``.
        backbone: backbone name (see ``backbones.BACKBONES``).
        input_shape: shape of one sample.
        num_classes: number of classes.
        device: where the model lives (see :func:`resolve_device`).
        seed: seeds everything random in the strategy.
        options: strategy-specific options, e.g. ``{"width": 128}``.
        registry: name → builder; defaults to :data:`STRATEGIES` (tests inject their own).

    Returns:
        The strategy.

    Raises:
        ValueError: for an unknown strategy name, an option the builder does not take, or a
            required option that is missing; the message lists the allowed names. The builder's
            own errors (e.g. an unknown backbone) propagate.
    """
    registry = STRATEGIES if registry is None else registry
    builder = _builder(name, registry)
    parameters = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    allowed = strategy_options(name, registry=registry)
    fixed = sorted(set(options) & set(FIXED_ARGUMENTS))
    if fixed:
        raise ValueError(f"{', '.join(map(repr, fixed))} cannot be set as options of strategy {name!r}")
    unknown = sorted(set(options) - set(allowed))
    if unknown and not takes_any:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for strategy {name!r}; "
            f"allowed: {', '.join(sorted(allowed)) or '(none)'}"
        )
    missing = sorted(key for key, default in allowed.items() if default is inspect.Parameter.empty)
    missing = [key for key in missing if key not in options]
    if missing:
        raise ValueError(f"strategy {name!r} needs option(s) {', '.join(map(repr, missing))}")
    return builder(
        backbone=backbone,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        device=device,
        seed=seed,
        **options,
    )


def resolve_device(spec: str) -> torch.device:
    """Turn a device setting into a ``torch.device``.

    Args:
        spec: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ValueError: for any other spec, or a CUDA spec when CUDA is not available or has no
            device N.
    """
    normalized = spec.strip().lower()
    if normalized == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if normalized == "cpu":
        return torch.device("cpu")
    match = _CUDA_SPEC.fullmatch(normalized)
    if match is None:
        raise ValueError(f"unknown device {spec!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine; use 'cpu' or 'auto'")
    index = match.group(1)
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ValueError(
            f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device(normalized)


def _builder(name: str, registry: Mapping[str, Callable[..., Strategy]]) -> Callable[..., Strategy]:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of: {', '.join(sorted(registry))}") from None
