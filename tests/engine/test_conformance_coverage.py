"""Every registered strategy runs through the conformance suite: a new strategy cannot skip it."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Collection, Iterable

import tests.engine
from server.engine.registry import STRATEGIES

from .conformance import StrategyConformance


def conformance_classes() -> list[type[StrategyConformance]]:
    """Every conformance class pytest collects in ``tests/engine``, importing each test module first."""
    for module in pkgutil.iter_modules(tests.engine.__path__):
        if module.name.startswith("test_"):
            importlib.import_module(f"{tests.engine.__name__}.{module.name}")
    found: list[type[StrategyConformance]] = []
    pending = list(StrategyConformance.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        module_name = cls.__module__.rsplit(".", 1)[-1]
        if cls.__name__.startswith("Test") and module_name.startswith("test_"):  # what pytest collects
            found.append(cls)
    return sorted(found, key=lambda cls: (cls.__module__, cls.__name__))


def uncovered(registry: Iterable[str], classes: Iterable[type[StrategyConformance]]) -> list[str]:
    """The registered strategy names that no conformance class tests."""
    covered = {getattr(cls, "strategy_name", None) for cls in classes}
    return sorted(name for name in registry if name not in covered)


def _how_to_add(names: Collection[str]) -> str:
    lines = [f"registered in server/engine/registry.py without a conformance class: {', '.join(names)}. Add:"]
    for name in names:
        title = "".join(part.capitalize() for part in name.replace("-", "_").split("_"))
        lines += [
            "",
            f"    # tests/engine/test_{name.replace('-', '_')}_conformance.py",
            "    from .conformance import StrategyConformance",
            "",
            f"    class Test{title}Conformance(StrategyConformance):",
            f'        strategy_name = "{name}"',
        ]
    lines += [
        "",
        "and relax a tolerance of tests/engine/conformance.py only where the strategy does not promise it,",
        "with the reason in a comment.",
    ]
    return "\n".join(lines)


def test_every_registered_strategy_has_a_conformance_class() -> None:
    missing = uncovered(STRATEGIES, conformance_classes())
    assert not missing, _how_to_add(missing)


def test_every_conformance_class_tests_a_registered_strategy() -> None:
    wrong = {
        f"{cls.__module__}.{cls.__name__}": getattr(cls, "strategy_name", "(no strategy_name)")
        for cls in conformance_classes()
        if getattr(cls, "strategy_name", None) not in STRATEGIES
    }
    assert not wrong, f"conformance classes naming no registered strategy: {wrong}; registered: {sorted(STRATEGIES)}"


def test_the_coverage_check_sees_a_strategy_without_conformance() -> None:
    classes = conformance_classes()
    assert {cls.strategy_name for cls in classes} == set(STRATEGIES)
    assert uncovered([*STRATEGIES, "new-one"], classes) == ["new-one"]
    assert "class TestNewOneConformance(StrategyConformance)" in _how_to_add(["new-one"])
