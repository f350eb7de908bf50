"""Output folders owned by an fguide job: what a command may overwrite, and what it must not.

Every command that writes into a folder (``sample``, ``finetune``, ``evaluate``,
``calibration``, ``demo``) claims it first with :func:`claim_folder`:

1. **check**, writing nothing: a folder holding a file that no job of this kind wrote there is
   refused, naming the file (a user's ``model.pt`` is never overwritten), and so is a folder
   owned by another kind of job, naming that kind;
2. **lock** ``.fguide.lock`` (``flock``: the operating system releases it when the process
   ends, a kill included), so a refused folder never gets a lock file;
3. **check again** under the lock, then write the **ownership record** ``.fguide.json``
   atomically: the job's kind, the names it writes (patterns, over top-level entries: a folder
   name covers what is inside), and the folder's random token;
4. delete the temporary files of writes cut short by a kill: only those whose name carries the
   folder's token (:func:`fguide.io.files.atomic_write` puts it there), never a user's file of
   similar name.

Rerunning a job of the same kind into its folder resumes or overwrites its own files. A folder
written by an fguide version from before the records is adopted when its main file proves it
(a sample run's manifest, a fine-tuning checkpoint, a ``metrics.json`` of fguide's evaluator,
...); files other than the job's are still refused. :func:`folder_kind` says what a folder is
(for the readers: a fine-tuning folder is not a sample batch).
"""

from __future__ import annotations

import fnmatch
import json
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fguide.io.files import RECORD, TEMP_TAG, atomic_write

__all__ = [
    "DEMO_FILES",
    "LOCK",
    "RECORD",
    "FolderInUseError",
    "FolderLock",
    "OwnedFolder",
    "check_folder",
    "claim_folder",
    "folder_kind",
    "kind_label",
    "remove_own_temps",
]

LOCK = ".fguide.lock"
FORMAT = "fguide-folder/1"
#: What the demo worlds write (fguide.worlds.demo, fguide.worlds.digits_run): kind → names.
DEMO_FILES = {
    "demo": ("results.json", "report.md", "*_vs_step.png", "samples_d*.png", "quality_vs_cost.png"),
    "demo-digits": (
        *("results.json", "report.md", "table.png", "curves.png", "samples.png"),
        *("calibration.png", "sweep", "runs"),
        "quality_vs_cost.png",  # the training-free family's cost (issue 21)
    ),
}
_LABELS = {"demo-digits": "demo --world digits"}
_SYSTEM_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")  # a file browser's, never written
Adopt = Callable[[Path], bool]


class FolderInUseError(ValueError):
    """Another process holds the output folder's lock."""


class FolderLock:
    """An exclusive lock on a job's folder, held by one process for the whole job.

    ``flock`` on ``out/.fguide.lock``: the operating system releases it when the process ends
    (a kill included), so a stale lock never blocks a rerun. The file names the holder.
    """

    def __init__(self, out: str | os.PathLike[str]):
        self.path = Path(out) / LOCK
        self._fh: IO[str] | None = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> FolderLock:
        """Take the lock, or raise :class:`FolderInUseError` naming its holder."""
        import fcntl
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is held
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise FolderInUseError(
                f"{self.path.parent} is in use by {holder}; wait for that run to end or use "
                "another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n"
        )
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None


def kind_label(kind: str) -> str:
    """How a job kind is named in messages (its command)."""
    return _LABELS.get(kind, kind)


# -- what a folder is ------------------------------------------------------------------------


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _by_fguide(obj: dict[str, Any] | None) -> bool:
    prov = obj.get("provenance") if obj else None
    return isinstance(prov, dict) and "fguide_version" in prov


_CALIBRATION_MODES = ("trajectory", "classifier")


def _legacy_kind(folder: Path) -> str | None:
    """The kind of a folder written before ownership records, from the files it proves."""
    manifest = _json_object(folder / "manifest.json")
    if manifest is not None and manifest.get("format") == "fguide-sample-run/1":
        return "sample"
    if (folder / "checkpoint.pt").is_file() and (
        (folder / "eval_before.json").is_file() or (folder / "log.jsonl").is_file()
    ):
        return "finetune"
    report = _json_object(folder / "report.json")
    if _by_fguide(report) and report is not None and "training" in report:
        return "finetune"
    metrics = _json_object(folder / "metrics.json")
    if metrics is not None and str(metrics.get("evaluator", "")).startswith("fguide-evaluator"):
        return "evaluate"
    calib = _json_object(folder / "calibration.json")
    if _by_fguide(calib) and calib is not None and calib.get("mode") in _CALIBRATION_MODES:
        return "calibration"
    results = _json_object(folder / "results.json")
    if _by_fguide(results) and results is not None:
        return "demo-digits" if results.get("world") == "digits" else "demo"
    return None


def _read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / RECORD
    if not path.exists():
        return None
    record = _json_object(path)
    files = record.get("files") if record else None
    if (
        record is None
        or record.get("format") != FORMAT
        or not isinstance(record.get("kind"), str)
        or not isinstance(files, list)
        or not all(isinstance(f, str) for f in files)
        or not str(record.get("token", "")).isalnum()
    ):
        raise ValueError(
            f"{path} is not a readable fguide folder record; if {folder} is yours to reuse, "
            f"remove {RECORD} and the files fguide wrote there"
        )
    return record


def folder_kind(folder: str | os.PathLike[str]) -> str | None:
    """The kind of job that owns ``folder`` (``sample``, ``finetune``, ``evaluate``,
    ``calibration``, ``demo``, ``demo-digits``), or None for a folder of no fguide job."""
    p = Path(folder)
    try:
        record = _read_record(p)
    except ValueError:
        return None
    return str(record["kind"]) if record is not None else _legacy_kind(p)


# -- claiming a folder -----------------------------------------------------------------------


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _own_temp(name: str, token: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp") and f".{TEMP_TAG}{token}-" in name


def _temp_of(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` looks like a temporary file of a write to one of ``patterns`` (such a
    file is left alone: neither deleted nor counted against the folder)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    target = name[1:-4].rsplit(".", 1)[0]
    return _matches(target, [*patterns, RECORD])


def _foreign(
    folder: Path, kind_files: tuple[str, ...], owned: Iterable[str], token: str | None
) -> list[str]:
    """Top-level entries of ``folder`` that no job of this kind wrote there."""
    owned = tuple(owned)
    out = []
    for entry in folder.iterdir():
        name = entry.name
        if name in (RECORD, LOCK, *_SYSTEM_FILES) or (token and _own_temp(name, token)):
            continue
        if _matches(name, owned) or _temp_of(name, (*owned, *kind_files)):
            continue
        if entry.is_dir() and _matches(name, kind_files) and not any(entry.iterdir()):
            continue  # an empty folder of the job's naming holds nothing to lose
        out.append(name)
    return sorted(out)


@dataclass
class Ownership:
    """What :func:`check_folder` found: the folder's record, or whether an old folder of this
    kind (no record) was adopted."""

    record: dict[str, Any] | None
    adopted: bool


def check_folder(
    out: str | os.PathLike[str],
    kind: str,
    files: Iterable[str],
    *,
    adopt: Adopt | None = None,
) -> Ownership:
    """Refuse ``out`` unless a job of ``kind`` writing ``files`` may write into it; writes
    nothing. ``adopt(out)`` says whether a folder without a record is an older one of this
    job (it may raise, naming a damaged file); by default its main file decides."""
    out = Path(out)
    kind_files = tuple(files)
    if not out.exists():
        return Ownership(None, False)
    if not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    record = _read_record(out)
    if record is not None:
        if record["kind"] != kind:
            raise ValueError(
                f"--out {out} is a fguide {kind_label(record['kind'])} folder; fguide "
                f"{kind_label(kind)} does not write into it. Use another --out."
            )
        owned, adopted, token = record["files"], False, str(record["token"])
    else:
        legacy = _legacy_kind(out)
        adopted = adopt(out) if adopt is not None else legacy == kind
        if not adopted and legacy not in (None, kind):
            raise ValueError(
                f"--out {out} is a fguide {kind_label(legacy)} folder; fguide "
                f"{kind_label(kind)} does not write into it. Use another --out."
            )
        owned, token = (kind_files if adopted else ()), None
    foreign = _foreign(out, kind_files, owned, token)
    if foreign:
        shown = ", ".join(foreign[:8]) + (" …" if len(foreign) > 8 else "")
        raise ValueError(
            f"--out {out} holds files that no fguide run wrote there ({shown}); refusing to "
            "overwrite them. Use an empty or new folder."
        )
    return Ownership(record, adopted)


def remove_own_temps(out: Path, token: str, dirs: Iterable[str] = ()) -> list[Path]:
    """Delete the temporary files carrying ``token`` in ``out`` and its subfolders ``dirs``
    (the lock is held: no write of this folder is in flight)."""
    removed = []
    for d in (out, *(out / s for s in dirs)):
        if d.is_dir():
            for p in d.glob(f".*.{TEMP_TAG}{token}-*.tmp"):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@dataclass
class OwnedFolder:
    """A folder claimed by a job (:func:`claim_folder`); a context manager releasing the lock."""

    path: Path
    kind: str
    token: str
    lock: FolderLock

    def __enter__(self) -> OwnedFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self.lock.release()


def _not_writable(out: Path, err: OSError) -> OSError:
    why = err.strerror or type(err).__name__
    return OSError(f"--out {out} is not writable ({why}); choose another folder")


def claim_folder(
    out: str | os.PathLike[str],
    kind: str,
    files: Iterable[str],
    *,
    adopt: Adopt | None = None,
    hold: bool = True,
) -> OwnedFolder:
    """Check, lock and record ``out`` as the folder of a job of ``kind`` (module docstring).

    ``files``: the names (fnmatch patterns) of the top-level files and folders the job writes.
    With ``hold`` the lock is kept until :meth:`OwnedFolder.release` (or the ``with`` block's
    end); without, it is released once the record is written. Refusals are ``ValueError``
    (``FolderInUseError`` for a held lock), a folder that takes no file an ``OSError`` saying so.
    """
    out = Path(out)
    files = tuple(files)
    first = check_folder(out, kind, files, adopt=adopt)
    lock = FolderLock(out)
    new_lock = not lock.path.exists()
    try:
        lock.acquire()
    except OSError as err:
        raise _not_writable(out, err) from None
    try:
        # Again under the lock: another job may have written between the check and the lock.
        now = check_folder(out, kind, files, adopt=lambda _: first.adopted)
        old = now.record or {}
        token = str(old.get("token") or secrets.token_hex(8))
        record = {
            "format": FORMAT,
            "kind": kind,
            "files": sorted({*old.get("files", ()), *files}),
            "token": token,
        }
        text = json.dumps(record, indent=2) + "\n"
        try:
            atomic_write(out / RECORD, lambda f: f.write(text.encode()), token=token)
        except OSError as err:
            raise _not_writable(out, err) from None
        remove_own_temps(out, token, [f for f in record["files"] if "*" not in f])
    except BaseException:
        lock.release()
        if new_lock and not (out / RECORD).exists():
            lock.path.unlink(missing_ok=True)  # a refused folder keeps no lock file of ours
        raise
    if not hold:
        lock.release()
    return OwnedFolder(out, kind, token, lock)
