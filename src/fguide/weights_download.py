"""Resumable, verified downloads of the weight files in :data:`fguide.weights.REGISTRY`.

A file is fetched into ``NAME.part`` beside its target; an interrupted transfer leaves the
partial file, and the next run asks only for the missing bytes (an HTTP ``Range`` request).
The SHA-256 of the whole file is checked before it is renamed into place (atomically), so the
target name only ever holds a complete, verified file; a mismatch removes the partial file and
names the file with both hashes. A file without a published SHA-256 is downloaded only with
``allow_unverified``, and its computed SHA-256 is reported so that it can be pinned. HTTP goes
through the standard library (``urllib.request``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fguide._version import __version__
from fguide.io.files import sha256_file
from fguide.weights import RemoteFile, WeightEntry, entries_for

__all__ = ["DownloadError", "FileResult", "download", "fetch_file", "unverified_files"]

CHUNK = 1 << 20
TIMEOUT_S = 60.0


class DownloadError(OSError):
    """A transfer that failed (HTTP error, unreachable host, cut connection): one line."""


@dataclass(frozen=True)
class FileResult:
    """What :func:`fetch_file` did with one file."""

    path: Path
    sha256: str
    verified: bool
    action: str
    """``downloaded``, ``resumed`` or ``present``."""


def unverified_files(entries: Iterable[WeightEntry]) -> list[str]:
    """The files (``entry/path``) of ``entries`` that have no published SHA-256."""
    return [
        f"{e.name}/{f.path}" if e.folder else e.name
        for e in entries
        for f in e.files
        if f.sha256 is None
    ]


def _open(url: str, offset: int) -> Any:
    """The HTTP response for ``url`` from byte ``offset`` on, or ``None`` when the server says
    there are no bytes past ``offset`` (416: the partial file already holds them all)."""
    headers = {"User-Agent": f"fguide/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
        )
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return None
        raise DownloadError(f"HTTP {err.code} {err.reason} for {url}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"cannot reach {url} ({err.reason})") from None
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(f"cannot download {url} ({err})") from None


def _resume_offset(resp: Any, offset: int, url: str) -> int:
    """Where the response's body starts: ``offset`` for a 206 that starts there, 0 for a
    server that ignored the Range header and sends the whole file."""
    if not offset or resp.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    if match is None or int(match.group(1)) != offset:
        raise DownloadError(
            f"{url}: asked for bytes from {offset}, the server sent "
            f"Content-Range {resp.headers.get('Content-Range')!r}"
        )
    return offset


def _expected_total(resp: Any, start: int, size: int | None, url: str) -> int | None:
    """The full file's byte count: the table's size, else what the response announces."""
    length = resp.headers.get("Content-Length")
    announced = start + int(length) if length is not None else None
    if size is not None and announced is not None and announced != size:
        raise DownloadError(
            f"{url}: the server's file has {announced} bytes, fguide's table says {size}"
        )
    return size if size is not None else announced


def _stream(resp: Any, f: IO[bytes], h: Any, bar: Any) -> int:
    """Copy the response body into ``f`` and the hash ``h``; the byte count copied."""
    n = 0
    while True:
        try:
            chunk = resp.read(CHUNK)
        except (OSError, http.client.HTTPException):
            break  # a cut connection: the caller sees the short count
        if not chunk:
            break
        f.write(chunk)
        h.update(chunk)
        bar.update(len(chunk))
        n += len(chunk)
    f.flush()
    os.fsync(f.fileno())
    return n


def _transfer(f: RemoteFile, part: Path, label: str, progress: bool) -> tuple[str, str]:
    """Bring ``part`` up to the whole file (resuming from its bytes); (SHA-256, action)."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    if f.size is not None and offset > f.size:  # not a prefix of this file
        part.unlink()
        offset = 0
    resp = None if f.size is not None and offset == f.size else _open(f.url, offset)
    if resp is None:
        return sha256_file(part), "resumed"
    with resp:
        start = _resume_offset(resp, offset, f.url)
        total = _expected_total(resp, start, f.size, f.url)
        h = hashlib.sha256()
        if start:  # the hash covers the partial bytes already on disk
            with open(part, "rb") as old:
                while block := old.read(CHUNK):
                    h.update(block)
        bar = tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
            file=sys.stderr,
        )
        with bar, open(part, "ab" if start else "wb") as out:
            got = start + _stream(resp, out, h, bar)
    if total is not None and got != total:
        raise DownloadError(
            f"{label}: the connection closed after {got} of {total} bytes; rerun the same "
            f"command to resume (the partial file {part} is kept)"
        )
    return h.hexdigest(), "resumed" if start else "downloaded"


def fetch_file(f: RemoteFile, target: Path, *, label: str, progress: bool = True) -> FileResult:
    """Download ``f`` to ``target`` through ``target.part`` (resumed if present), check its
    SHA-256 (when the table has one) and rename it into place. An existing ``target`` is
    checked, never overwritten: a different file there raises ``ValueError``.
    """
    if target.is_file():
        got = sha256_file(target)
        if f.sha256 is not None and got != f.sha256:
            raise ValueError(
                f"{target} exists but is not {label}: SHA-256 expected {f.sha256}, got {got}; "
                "move it away and rerun"
            )
        return FileResult(target, got, f.sha256 is not None, "present")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    got, action = _transfer(f, part, label, progress)
    if f.sha256 is not None and got != f.sha256:
        part.unlink(missing_ok=True)
        raise ValueError(
            f"{label}: SHA-256 mismatch: expected {f.sha256}, got {got}; the download was removed"
        )
    os.replace(part, target)
    return FileResult(target, got, f.sha256 is not None, action)


def download(
    names: Iterable[str],
    dest: Path,
    *,
    allow_unverified: bool = False,
    progress: bool = True,
    registry: Mapping[str, WeightEntry] | None = None,
    report: Callable[[str], None] = print,
) -> list[FileResult]:
    """Download the named files or folders (or a configuration's files) into ``dest``.

    Files without a published SHA-256 are refused, before anything is fetched, unless
    ``allow_unverified``; their computed SHA-256 is then reported. A folder's files are
    fetched in the table's order (weights first, the file that marks the folder last).
    """
    entries = entries_for(names, registry)
    unverified = unverified_files(entries)
    if unverified and not allow_unverified:
        raise ValueError(
            f"no published SHA-256 for {', '.join(unverified)}; rerun with --allow-unverified "
            "to download them unchecked (their SHA-256 is printed so you can pin it)"
        )
    results = []
    for e in entries:
        for f in e.files:
            label = f"{e.name}/{f.path}" if e.folder else e.name
            r = fetch_file(f, e.target(dest, f), label=label, progress=progress)
            state = "verified" if r.verified else "UNVERIFIED (no published SHA-256)"
            report(f"{r.action}: {r.path} SHA-256 {r.sha256} {state}")
            results.append(r)
        for path, note in e.local_only:
            if not (dest / e.name / path).is_file():
                report(f"still needed: {dest / e.name / path}: {note.format(folder=dest / e.name)}")
    return results
