"""docs/configuration.md is generated from the configuration dataclasses and must not drift from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from server.config import Config, load_config
from server.config_docs import DEFAULT_OUTPUT, builder_arguments, collect, field_comments, main, render
from server.engine.registry import STRATEGIES, strategy_options


def test_configuration_reference_is_up_to_date() -> None:
    assert DEFAULT_OUTPUT.read_text() == render(), (
        "docs/configuration.md is stale: regenerate it with `python -m server.config_docs`"
    )
    assert main(["--check"]) == 0


def test_check_flags_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(render().replace("50051", "50052"))
    assert main(["--check", "--output", str(stale)]) == 1
    assert main(["--output", str(stale)]) == 0 and stale.read_text() == render()


def test_every_key_is_documented_with_a_working_env_var() -> None:
    sections = collect()
    assert [name for name, _, _ in sections] == [f.name for f in dataclasses.fields(Config)]
    defaults = Config()
    for section, doc, keys in sections:
        assert doc, f"[{section}] has no docstring"
        assert [k.name for k in keys] == [f.name for f in dataclasses.fields(getattr(defaults, section))]
        for key in keys:
            assert key.description, f"{section}.{key.name} has no description (add a #: comment in server/config.py)"
            assert f"| `{key.name}` |" in render()
            if key.env == "-":
                continue
            env = key.env.split(",")[0]
            assert env == f"LETHE_{section}_{key.name}".upper()
            # The documented variable really sets the key: feed the default back through it.
            value = getattr(getattr(defaults, section), key.name)
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            if isinstance(value, tuple) and not value:
                continue
            loaded = load_config(env={env: text})
            assert getattr(getattr(loaded, section), key.name) == value, env


def test_comments_are_read_from_the_source() -> None:
    source = (
        "class S:\n"
        "    #: First line\n"
        "    #: second line.\n"
        "    a: int = 1\n"
        "    b: int = 2  # trailing note\n"
        "    c: int = 3\n"
    )
    assert field_comments(source) == {("S", "a"): "First line second line.", ("S", "b"): "trailing note"}


def test_every_strategy_option_is_described_in_its_builder() -> None:
    for name, builder in STRATEGIES.items():
        described = builder_arguments(builder)
        missing = [option for option in strategy_options(name) if not described.get(option)]
        assert not missing, f"{name}: options without a description in the builder's Args: {missing}"
    assert builder_arguments(STRATEGIES["uncle"])["refit_head"].endswith("inputs + 1).")  # continuation lines join
