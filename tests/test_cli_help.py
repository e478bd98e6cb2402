"""Every option of every `mil` command says what it does in `--help` (issue 13: options without help or default)."""

from __future__ import annotations

import argparse

import pytest

from mil.cli import COMMANDS, DefaultsShown, command_parser

# Commands whose options are still being documented on another branch (none now: every command is covered).
PENDING_ELSEWHERE: set[str] = set()


def _options(name: str) -> list[argparse.Action]:
    parser = command_parser(name)
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - PENDING_ELSEWHERE))
def test_every_option_has_help(name):
    undocumented = [a.option_strings[0] for a in _options(name) if not (a.help or "").strip()]
    positional = [a.dest for a in command_parser(name)._actions if not a.option_strings and not (a.help or "").strip()]
    assert not undocumented and not positional, f"mil {name}: no help text for {undocumented + positional}"


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - PENDING_ELSEWHERE))
def test_help_shows_defaults(name):
    """A default that is a real value appears in --help (DefaultsShown), so nobody reads the code for it."""
    parser = command_parser(name)
    assert isinstance(parser.formatter_class, type) and issubclass(parser.formatter_class, argparse.HelpFormatter)
    text = parser.format_help()
    for action in _options(name):
        if (
            action.nargs == 0
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
        ):
            continue  # flags, and options whose help says where the value comes from instead
        assert str(action.default) in text, f"mil {name} {action.option_strings[0]}: default {action.default!r} hidden"


def test_the_check_catches_an_option_without_help():
    parser = argparse.ArgumentParser(formatter_class=DefaultsShown)
    parser.add_argument("--size", type=int, default=3)
    actions = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert [a.option_strings[0] for a in actions if not (a.help or "").strip()] == ["--size"]


def test_pending_list_names_only_real_or_announced_commands():
    """A typo in the skip-list would silently skip nothing; new commands not merged yet are allowed."""
    announced = {"run", "init", "pretrain", "probe"}
    assert PENDING_ELSEWHERE - announced <= set(COMMANDS)
