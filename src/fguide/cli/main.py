"""``fguide`` entry point: dispatches to one module per command.

Each command module defines ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pickle
import sys
import zipfile
from collections.abc import Sequence

from fguide.cli.file_flags import name_flag

COMMANDS = {
    "demo": "fguide.cli.demo",
    "sample": "fguide.cli.sample",
    "evaluate": "fguide.cli.evaluate",
    "calibration": "fguide.cli.calibration",
    "finetune": "fguide.cli.finetune",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fguide", description="Classifier-guided diffusion sampling with regularised guidance."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(p)
        p.set_defaults(_module=module, _parser=p)
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


def error_message(err: BaseException) -> str | None:
    """The one-line message for a user error, or None for an error that is a bug."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        return f"no space left on device{where}; free space and rerun (finished work is kept)"
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except Exception as err:
        message = error_message(err)
        if message is None or args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        line = " ".join(name_flag(args, err, message).split())
        print(f"fguide {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
