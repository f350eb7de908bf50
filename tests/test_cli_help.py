"""Every command's ``--help`` stands alone, and every numeric flag refuses a bad number.

The commands are discovered from ``fguide.cli.main.COMMANDS`` (a new command is checked
without editing this file): each flag has a help text, a default shown where it has one, the
same metavar as the same flag of the other commands, and a number parsed by a checked type
(:class:`fguide.params.Range`) that refuses non-finite and out-of-range values in one line.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator

import pytest

from fguide.cli import CLASSIFIER_FORMS
from fguide.cli.main import COMMANDS, build_parser, main
from fguide.params import Range

# Commands whose flags another branch owns; their cases are expected to fail until it merges.
PENDING: dict[str, str] = {}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {
        name: sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    }


def _all_commands() -> list[str]:
    """Every command and nested subcommand (``weights download``), found from the parser."""
    found: list[str] = []

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        for name, sub in _subcommands(parser).items():
            path = f"{prefix} {name}".strip()
            found.append(path)
            walk(path, sub)

    walk("", build_parser())
    assert set(COMMANDS) <= set(found)
    return found


def _commands() -> list[object]:
    return [
        pytest.param(c, marks=pytest.mark.xfail(reason=PENDING[c], strict=False))
        if c.split()[0] in PENDING
        else c
        for c in _all_commands()
    ]


def _parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in command.split():
        parser = _subcommands(parser)[name]
    return parser


def _listed(command: str) -> Iterator[argparse.Action]:
    """The actions ``--help`` lists (not -h itself, not hidden older spellings, not the
    subcommand choice, whose subcommands are checked as commands of their own)."""
    for action in _parser(command)._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            continue
        yield action


def _name(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "usage:" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("command", _commands())
def test_help_runs_and_every_flag_has_a_help_text_and_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    formatter = _parser(command)._get_formatter()
    for action in _listed(command):
        assert action.option_strings == [] or action.option_strings[0] in text, _name(action)
        assert action.help, f"{command} {_name(action)}: no help text"
        # A switch (no value) is off unless given; any other default must be shown.
        shown = action.nargs != 0 and action.default not in (None, False, argparse.SUPPRESS)
        if shown:
            expanded = formatter._expand_help(action)
            assert "default" in expanded.lower(), f"{command} {_name(action)}: {expanded!r}"
    assert "METHODS.md" not in text  # the document does not ship with the package


def _metavars(command: str) -> dict[str, str]:
    """Flag → metavar of the flags that take a value (a choices list shows itself)."""
    return {
        action.option_strings[0]: str(action.metavar or action.dest.upper())
        for action in _listed(command)
        if action.option_strings and action.nargs != 0 and action.choices is None
    }


# One flag name, two concepts (each with its own metavar).
HOMONYMS = {"--labels"}  # sample: the labels' mode or class; calibration: legend labels


@pytest.mark.parametrize("command", _commands())
def test_one_metavar_per_flag_across_commands(command: str) -> None:
    mine = {k: v for k, v in _metavars(command).items() if k not in HOMONYMS}
    for other in _all_commands():
        if other == command or other.split()[0] in PENDING:
            continue
        theirs = _metavars(other)
        for flag in mine.keys() & theirs.keys():
            assert mine[flag] == theirs[flag], (
                f"{flag}: {command} {mine[flag]}, {other} {theirs[flag]}"
            )


def test_every_classifier_flag_lists_the_same_forms() -> None:
    with_classifier = [c for c in COMMANDS if "--classifier" in _metavars(c)]
    assert {"sample", "calibration", "finetune"} <= set(with_classifier)
    for command in with_classifier:
        action = next(a for a in _listed(command) if "--classifier" in a.option_strings)
        assert CLASSIFIER_FORMS in " ".join(str(action.help).split()), command


def _bad_values(domain: Range) -> Iterator[str]:
    """Values just outside ``domain``, and the non-numbers and non-finite numbers it refuses."""
    yield "x"
    if domain.kind is int:
        yield "1.5"
    else:
        yield "nan"
        yield "-inf"
        if not domain.allow_inf:
            yield "inf"
    if domain.low is not None:
        yield repr(domain.low if domain.low_open else domain.low - 1)
    if domain.high is not None:
        yield repr(domain.high + 1)


def _numeric_commands() -> list[object]:
    """The commands with a flag that takes a number (checked or not: an unchecked one fails)."""
    return [
        c
        for c in _commands()
        if any(
            a.option_strings and (isinstance(a.type, Range) or a.type in (int, float))
            for a in _parser(c if isinstance(c, str) else c.values[0])._actions  # type: ignore[attr-defined]
        )
    ]


@pytest.mark.parametrize("command", _numeric_commands())
def test_every_numeric_flag_refuses_bad_numbers_in_one_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    checked = 0
    for action in _parser(command)._actions:
        if not action.option_strings:
            continue
        assert action.type not in (int, float), f"{command} {action.option_strings[0]}: unchecked"
        if not isinstance(action.type, Range):
            continue
        flag = action.option_strings[0]
        for bad in _bad_values(action.type):
            line = _one_line_error(capsys, [*command.split(), flag, bad])
            assert line.startswith(f"fguide {command}: error: argument {flag}"), line
            assert line.endswith(f"(see fguide {command} --help)"), line
        # the domain's own edge is accepted (no error before the later required-flag checks)
        edge = action.type.low if action.type.low is not None and not action.type.low_open else 1
        assert action.type(repr(edge)) == edge and not math.isnan(edge)
        checked += 1
    assert checked or command in PENDING, f"{command}: no checked numeric flag"
