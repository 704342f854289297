"""Strategy registry and device resolution."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from server.engine.registry import STRATEGIES, build_strategy, resolve_device, strategy_options

CPU = torch.device("cpu")
FIXED: dict[str, Any] = {"backbone": "mlp", "input_shape": (1, 8, 8), "num_classes": 10, "device": CPU, "seed": 0}


class RecordingBuilder:
    """A named fake builder: records what it was given."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        *,
        backbone: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        device: torch.device,
        seed: int,
        beta: float,
        chunks: int = 4,
    ) -> Any:
        self.calls.append({"backbone": backbone, "seed": seed, "beta": beta, "chunks": chunks})
        return "built"


def test_finetune_is_registered() -> None:
    assert "finetune" in STRATEGIES
    assert strategy_options("finetune") == {
        "cifar_stem": True,
        "width": 0,
        "retain_training_data": False,
        "capacity": "off",
        "grow_percent": 25.0,
        "grow_loss": 0.5,
        "grow_patience": 10,
        "max_width_factor": 8.0,
    }


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'; expected one of: .*finetune"):
        build_strategy("nope", options={}, **FIXED)


def test_unknown_option_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"'widht'.*allowed: capacity, cifar_stem, .*retain_training_data, width"):
        build_strategy("finetune", options={"widht": 3}, **FIXED)


def test_fixed_arguments_are_not_options() -> None:
    with pytest.raises(ValueError, match="'seed'"):
        build_strategy("finetune", options={"seed": 3}, **FIXED)


def test_options_reach_the_builder_and_required_ones_are_enforced() -> None:
    builder = RecordingBuilder()
    registry = {"fake": builder}
    assert build_strategy("fake", options={"beta": 0.1}, registry=registry, **FIXED) == "built"
    assert builder.calls == [{"backbone": "mlp", "seed": 0, "beta": 0.1, "chunks": 4}]
    with pytest.raises(ValueError, match=r"needs option.*'beta'"):
        build_strategy("fake", options={}, registry=registry, **FIXED)


def test_builder_errors_propagate() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_strategy("finetune", options={}, **{**FIXED, "backbone": "vgg"})


def test_resolve_device_cpu_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device(" CPU ") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_resolve_device_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(spec)


def test_resolve_device_cuda_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "mps", "cuda:", "cuda:x", ""])
def test_resolve_device_rejects_other_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device(spec)
