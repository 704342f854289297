"""Every ``lethe`` subcommand, option and argument explains itself in ``--help``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from client.cli import build_parser


def _undocumented(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
    """``path option`` for every action of ``parser`` and its subcommands that has no help text."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            documented = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not documented.get(name):
                    yield f"{path} {name} (the subcommand)"
                yield from _undocumented(sub, f"{path} {name}")
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            yield f"{path} {'/'.join(action.option_strings) or action.dest}"


def _commands() -> list[str]:
    return sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def test_every_subcommand_and_option_has_help_text() -> None:
    missing = list(_undocumented(build_parser(), "lethe"))
    assert not missing, "no help text: " + ", ".join(missing)


@pytest.mark.parametrize("command", _commands())
def test_help_of_each_command_prints_and_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: lethe {command}" in capsys.readouterr().out
