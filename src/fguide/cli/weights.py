"""``fguide weights``: where every weight file comes from, and a verified download of it.

    fguide weights list
    fguide weights download elucd-r101-128 --dir ~/weights     # a configuration's files
    fguide sample --config elucd-r101-128 --weights-dir ~/weights --out runs/r101

See :mod:`fguide.weights` (the table, with the source of every size and SHA-256) and
:mod:`fguide.weights_download` (resumable, verified, atomic).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fguide import weights
from fguide.weights import RemoteFile, WeightEntry, entries_for

HELP = "List the weight files the configurations and evaluation need, or download them."


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="weights_command", metavar="{list,download}")
    ls = sub.add_parser(
        "list",
        help="every file: official URL, size, SHA-256, the configurations that need it",
        description="Every weight file or folder fguide's named configurations and fguide "
        "evaluate need: official URL, size and SHA-256 ('unknown' where no public source "
        "states it), and the configurations that need it.",
    )
    ls.add_argument(
        "names", nargs="*", metavar="NAME", help="only these files, folders or configurations"
    )
    dl = sub.add_parser(
        "download",
        help="download files, folders or a configuration's files (resumable, verified)",
        description="Download into DIR, resuming a partial file (NAME.part), checking the "
        "SHA-256 before the file is renamed into place. Then --weights-dir DIR finds them.",
    )
    dl.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help="a file or folder name from 'fguide weights list', or a configuration name",
    )
    dl.add_argument("--dir", type=Path, required=True, metavar="DIR", help="destination folder")
    dl.add_argument(
        "--allow-unverified",
        action="store_true",
        help="also download files without a published SHA-256 (their SHA-256 is printed)",
    )
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    return f"{n:,} bytes" + (f" ({n / 2**20:,.1f} MiB)" if n >= 2**20 else "")


def _file_lines(f: RemoteFile, indent: str) -> list[str]:
    return [
        f"{indent}{_size(f.size)}, SHA-256 {f.sha256 or 'unknown'}",
        f"{indent}{f.url}",
    ]


def describe(entry: WeightEntry) -> list[str]:
    """The ``fguide weights list`` lines of one entry."""
    lines = [f"{entry.name}{'/ (folder)' if entry.folder else ''}  [{entry.role}]"]
    lines.append(f"  needed by: {', '.join(entry.configs) or '(no configuration)'}")
    if entry.note:
        lines.append(f"  {entry.note}")
    if entry.folder:
        for f in entry.files:
            lines += [f"  {f.path}", *_file_lines(f, "    ")]
    else:
        lines += _file_lines(entry.files[0], "  ")
    for path, note in entry.local_only:
        lines.append(f"  {path}: not downloadable: {note.format(folder=entry.name)}")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.weights_command == "download":
        from fguide.weights_download import download

        download(
            args.names,
            args.dir,
            allow_unverified=args.allow_unverified,
            progress=not args.no_progress,
        )
        print(f"use them with: --weights-dir {args.dir}")
        return 0
    entries = (
        entries_for(args.names) if getattr(args, "names", None) else list(weights.REGISTRY.values())
    )
    for entry in entries:
        print("\n".join(describe(entry)))
    print("download: fguide weights download NAME... --dir DIR; then --weights-dir DIR")
    return 0
