"""``fguide calibration``: placeholder, being written."""

from __future__ import annotations

import argparse

HELP = "(not yet available)"


def configure(p: argparse.ArgumentParser) -> None:
    del p


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("fguide calibration is not implemented yet")
