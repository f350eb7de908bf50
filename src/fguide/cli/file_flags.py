"""Which flag gave the file a user error is about: ``--model: FILE: what is wrong; expected …``.

The loaders name the file in their messages (and what it should be); only the command line
knows which flag the file came from. :func:`name_flag` finds the flag whose file or folder the
message names and puts the flag first, so that every file error names file, flag and content.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

__all__ = ["name_flag"]

_BEFORE = " '\"(:=["
_AFTER = " '\":,;)]/"  # "/": a file inside a folder the flag gave


def _paths(value: Any) -> list[str]:
    """The spellings of the paths a flag's value holds (a Path, or a string naming a file)."""
    out: list[str] = []
    for v in value if isinstance(value, list | tuple) else [value]:
        if isinstance(v, str) and ":" in v and not os.path.exists(v):
            v = v.split(":", 1)[1]  # a guide spec such as clip:FOLDER
        if isinstance(v, Path) or (isinstance(v, str) and v and os.path.exists(v)):
            out += [p for p in dict.fromkeys((str(v), str(Path(v)))) if p not in (".", "..")]
    return out


def _names(message: str, path: str) -> bool:
    """True when ``message`` names ``path`` as a whole (or a file inside it)."""
    start = message.find(path)
    while start >= 0:
        end = start + len(path)
        before = message[start - 1] if start else " "
        after = message[end] if end < len(message) else " "
        if before in _BEFORE and after in _AFTER:
            return True
        start = message.find(path, start + 1)
    return False


def _spelling(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else (action.option_strings or [action.dest])[0]


def name_flag(args: argparse.Namespace, err: BaseException, message: str) -> str:
    """``message`` led by the flag whose file or folder it names (its CLI spelling); unchanged
    when it names none or already spells the flag. A leading config-field name (``model:``)
    is replaced by the flag."""
    parser = getattr(args, "_parser", None)
    if parser is None:
        return message
    filename = getattr(err, "filename", None)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        for path in _paths(value):
            if not (_names(message, path) or (filename is not None and str(filename) == path)):
                continue
            flag = _spelling(action)
            if flag in message:
                return message
            for lead in (f"{action.dest}: ", f"{action.dest.replace('_', ' ')}: "):
                message = message.removeprefix(lead)
            return f"{flag}: {message}"
    return message
