"""``fguide`` entry point: dispatches to one module per command.

Each command module defines ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``,
and optionally ``PARAM_ALIASES`` (API parameter name → the dest of the flag that sets it).

Exit codes: 0 done; 2 the input is wrong (a bad flag or value, a missing, unreadable or
unsuitable file or folder: one line naming it); 1 the computation diverged or failed at
well-formed settings (a non-finite guidance, sample or training loss, e.g. ``finetune --lr
1e30``; a distributed run whose processes disagree); 130 interrupted (finished work is kept).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping, Sequence
from typing import NoReturn

from fguide.cli.file_flags import name_flag
from fguide.params import ParamError

COMMANDS = {
    "demo": "fguide.cli.demo",
    "sample": "fguide.cli.sample",
    "evaluate": "fguide.cli.evaluate",
    "calibration": "fguide.cli.calibration",
    "finetune": "fguide.cli.finetune",
    "weights": "fguide.cli.weights",
}


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (the usage stays in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")


def flag_table(parser: argparse.ArgumentParser, aliases: Mapping[str, str] = {}) -> dict[str, str]:
    """Parameter name → the flag a user types: each listed option's dest → its first long
    option string (a positional: its metavar), plus ``aliases`` (API name → dest)."""
    table: dict[str, str] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest in table:
            continue  # hidden older spellings never name a parameter
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs:
            table[action.dest] = longs[0]
        elif not action.option_strings:
            table[action.dest] = str(action.metavar or action.dest.upper())
    for name, dest in aliases.items():
        table.setdefault(name, table[dest])
    return table


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``fguide`` parser; with ``only``, the other commands are listed but not configured,
    so that running one command does not import the others' modules (scipy, plotting, ...)."""
    parser = OneLineParser(
        prog="fguide", description="Classifier-guided diffusion sampling with regularised guidance."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(p)
        aliases = getattr(module, "PARAM_ALIASES", {})
        p.set_defaults(_module=module, _parser=p, _flags=flag_table(p, aliases))
    return parser


DEBUG_ENV = "FGUIDE_DEBUG"

# What a user can cause and mend: bad values, unreadable, malformed or unsafe files, a full or
# read-only disk. These end in one line and exit code 2; anything else is a bug and keeps its
# traceback.
USER_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    KeyError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)


# What each command keeps when the disk fills up (every write is atomic: a file is whole or
# absent), so the message says what a rerun finds.
KEPT_ON_FULL_DISK = {
    "sample": "complete shards are kept and the rerun resumes",
    "finetune": "the last checkpoint written is kept and the rerun resumes from it",
    "evaluate": "cached reference features are kept",
    "calibration": "files written so far are whole; the rerun computes everything again",
    "demo": "the digits world reuses its cached networks and finished runs; the other demo "
    "reruns in seconds",
}


def error_message(
    err: BaseException, flags: Mapping[str, str] = {}, command: str | None = None
) -> str | None:
    """The one-line message for a user error, or None for an error that is a bug.

    A :class:`~fguide.params.ParamError` names each parameter by its entry in ``flags`` (the
    command's :func:`flag_table`), so the API's ``num_samples`` reads ``--num-samples`` here;
    a full disk says what ``command`` keeps.
    """
    if isinstance(err, ParamError):
        return err.spelled(lambda name: flags.get(name, name))
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        kept = KEPT_ON_FULL_DISK.get(command or "", "files written before are whole")
        return f"no space left on device{where}; free space and rerun ({kept})"
    if isinstance(err, RuntimeError) and any(
        k in str(err) for k in ("PytorchStreamWriter", "PytorchStreamReader", "inline_container")
    ):
        # torch's zip reader/writer: a truncated or damaged file, or a full disk while saving
        return f"a torch file could not be read or written (damaged file or full disk): {err}"
    if isinstance(err, KeyError):
        return f"malformed input: missing entry {err}"
    if isinstance(err, USER_ERRORS):
        return str(err) or type(err).__name__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option (the top level's only one, --debug,
    # takes no value); an unknown word gets the full parser, which lists the commands.
    word = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(word if word in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's parser, which points to its own --help
        (args._parser if args.command else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except Exception as err:
        message = error_message(err, args._flags, args.command)
        if message is None or args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        line = " ".join(name_flag(args, err, message).split())
        print(f"fguide {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
