"""``constraints.txt`` stays in step with ``pyproject.toml``, and the running environment with it.

``make install`` installs with ``-c constraints.txt``; ``make pins`` regenerates the file with uv. The
file pins the whole resolution of the base, ``server`` and ``dev`` requirements (CPython 3.11, x86-64
Linux, the CUDA wheels of torch included) as plain ``name==version`` lines: no index, find-links or
other URL may ever be in it (the project never commits a lock file that names a registry).
"""

from __future__ import annotations

import platform
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PINS = ROOT / "constraints.txt"
EXTRAS = ("server", "dev")
PIN_LINE = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(?P<version>[A-Za-z0-9.+!_-]+)$")
REFRESH = "make pins (after editing pyproject.toml), then make install"


def _requirements() -> list[Requirement]:
    """The base requirements and those of the ``server`` and ``dev`` extras, as pyproject declares them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in EXTRAS:
        declared += project["optional-dependencies"][extra]
    return [Requirement(line) for line in declared]


def _applies(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate({"extra": ""})


def _pins() -> dict[NormalizedName, Version]:
    pins: dict[NormalizedName, Version] = {}
    for number, raw in enumerate(PINS.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN_LINE.match(line)
        assert match, f"constraints.txt:{number}: {raw!r} is not a name==version pin"
        name = canonicalize_name(match["name"])
        assert name not in pins, f"constraints.txt:{number}: {name} is pinned twice"
        pins[name] = Version(match["version"])
    return pins


def test_constraints_file_has_only_pins_and_no_urls() -> None:
    text = PINS.read_text()
    assert "://" not in text, "constraints.txt must not name a registry or any other URL"
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        assert not line.startswith("-"), f"constraints.txt:{number}: option line {raw!r} (index, find-links, -e, -r)"
    assert len(_pins()) > len(_requirements())  # the transitive dependencies are pinned too


def test_every_requirement_is_pinned_within_its_specifier() -> None:
    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} has no pin in constraints.txt: {REFRESH}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}: {REFRESH}"
        )


def test_installed_direct_dependencies_match_the_pins() -> None:
    """A venv installed before the pins changed (or without ``make install``) is stale: say so.

    A local version label is accepted as ``==`` accepts it in a constraint (torch ``2.15.0+cpu``
    from PyTorch's CPU index satisfies the pin ``torch==2.15.0``).
    """
    pins = _pins()
    stale = []
    for requirement in filter(_applies, _requirements()):
        name = canonicalize_name(requirement.name)
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            stale.append(f"{name} not installed (pinned {pins[name]})")
            continue
        if not SpecifierSet(f"=={pins[name]}").contains(installed, prereleases=True):
            stale.append(f"{name} {installed} installed, {pins[name]} pinned")
    assert not stale, f"the environment does not match constraints.txt ({'; '.join(stale)}): run make install"


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info[:2] == (3, 11)),
    reason="the pins are resolved for CPython 3.11 on x86-64 Linux; elsewhere the dependency tree differs",
)
def test_every_installed_transitive_dependency_is_pinned() -> None:
    """Walks the installed dependency tree of the requirements: every package in it has a pin."""
    pins = _pins()
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    todo = [(requirement, "") for requirement in filter(_applies, _requirements())]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        assert name in pins, f"{name} (needed for {requirement}) has no pin in constraints.txt: {REFRESH}"
        for line in metadata.requires(name) or []:
            todo += [(Requirement(line), chosen) for chosen in ("", *sorted(requirement.extras))]
