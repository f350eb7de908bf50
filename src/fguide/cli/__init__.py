"""Command-line interface: one thin module per command (parse, call, print)."""

from __future__ import annotations

import argparse
from typing import Any


def add_hidden_alias(parser: Any, flag: str, dest: str, **kwargs: Any) -> None:
    """An older spelling ``flag`` of the option stored in ``dest``: accepted, not listed."""
    parser.add_argument(
        flag, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs
    )
