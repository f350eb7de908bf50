"""The sampling run folder: one module owns its files, shards, identity and merge.

Layout of a run folder ``out/`` (written by ``fguide sample``; read by ``fguide evaluate`` and
``fguide calibration`` through :func:`read_run`):

- ``shards/shard-<i0>-<i1>.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels), ``.traj.npz``
  (mergeable per-step trajectory statistics) and ``.json`` (the sidecar: sample range, SHA-256
  of both files, the run identity's SHA-256). A shard counts as done only when its sidecar
  exists and both checksums match; the sidecar is written last.
- ``samples.npz``: the shards merged in index order, byte-reproducibly (``np.savez`` layout,
  fixed zip timestamps); ``grid.png``; ``trajectory.json``; ``manifest.json`` (status
  ``running`` → ``complete`` or ``incomplete``, the identity, the shards, provenance, and the
  SHA-256 of ``samples.npz`` and ``trajectory.json``, which the readers check:
  :func:`check_samples`, :func:`check_trajectory`).
- ``.fguide.json`` and ``.fguide.lock``: the folder's ownership record and lock
  (:mod:`fguide.io.folders`; :func:`claim_run_folder`).

Every write is atomic (temporary file, then rename), so a kill at any moment leaves each file
whole or absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from fguide.diagnostics import StepStatistic, TrajectoryRecorder, merge_statistic_states
from fguide.io.files import (
    atomic_write,
    atomic_write_json,
    image_grid_png,
    provenance,
    sha256_file,
)
from fguide.io.folders import (
    LOCK,
    FolderInUseError,
    FolderLock,
    OwnedFolder,
    Ownership,
    check_folder,
    claim_folder,
)

__all__ = [
    "FORMAT",
    "GRID",
    "KIND",
    "LOCK",
    "MANIFEST",
    "RUN_FILES",
    "SAMPLES",
    "SHARDS",
    "TRAJECTORY",
    "ConfigMismatchError",
    "FolderInUseError",
    "FolderLock",
    "OwnedFolder",
    "RunInfo",
    "ShardFiles",
    "adopt_run_folder",
    "canonical",
    "check_run_folder",
    "check_samples",
    "check_trajectory",
    "claim_run_folder",
    "identity_sha256",
    "is_run_folder",
    "merge_states",
    "recorder_state",
    "merge_run",
    "plan_shards",
    "prepare_folder",
    "read_run",
    "write_shard",
]

SAMPLES = "samples.npz"
TRAJECTORY = "trajectory.json"
MANIFEST = "manifest.json"
GRID = "grid.png"
SHARDS = "shards"
FORMAT = "fguide-sample-run/1"
KIND = "sample"  # the job kind of a run folder (fguide.io.folders)
RUN_FILES = (SAMPLES, TRAJECTORY, MANIFEST, GRID, SHARDS)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: equal runs give equal bytes


class ConfigMismatchError(ValueError):
    """The output folder holds a run with another configuration."""


def plan_shards(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """The shards [i0, i1) covering [0, num_samples): fixed blocks of ``shard_size``."""
    return [(i, min(i + shard_size, num_samples)) for i in range(0, num_samples, shard_size)]


# -- trajectory statistics (mergeable over batches, shards and ranks) -------------------------

TrajState = dict[str, NDArray[Any]]


def recorder_state(rec: TrajectoryRecorder | None) -> TrajState:
    return rec.state() if rec is not None else {"steps": np.zeros(0, dtype=np.int64)}


def merge_states(states: Iterable[TrajState]) -> TrajState:
    """Merge per-step statistics in the given order (so equal inputs give equal floats).

    A state may also carry other per-step statistics (a guide's, e.g. the CLIP score:
    :class:`fguide.diagnostics.StepStatistic`, under ``{name}_steps`` / ``{name}_sums``); those
    merge alongside, whatever they are.
    """
    states = list(states)
    merged: TrajectoryRecorder | None = None
    for s in states:
        if len(s["steps"]) == 0:
            continue
        rec = TrajectoryRecorder.from_state(s)
        if merged is None:
            merged = rec
        elif merged.steps != rec.steps:
            raise ValueError("trajectory statistics with different steps cannot be merged")
        else:
            merged.merge(rec)
    return {**recorder_state(merged), **merge_statistic_states(states)}


def trajectory_dict(
    state: TrajState, statistics: Sequence[type[StepStatistic]] = ()
) -> dict[str, Any]:
    """``trajectory.json``'s content from a merged state, with the curves of each of the
    ``statistics`` the state holds (the run's guide says which: e.g. the CLIP score)."""
    traj = TrajectoryRecorder.from_state(state).to_dict()
    for statistic in statistics:
        if f"{statistic.name}_steps" in state:
            statistic.from_state(state).add_to(traj)
    return traj


# -- files --------------------------------------------------------------------------------------


def _npz_entry(
    zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[Any]
) -> None:
    """Write ``name.npy`` into ``zf`` from chunks (the rows of a C-order array), streaming."""
    info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    rows = 0
    with zf.open(info, "w", force_zip64=True) as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for chunk in chunks:
            arr = np.ascontiguousarray(chunk, dtype=dtype)
            rows += arr.shape[0] if arr.ndim else 1
            fh.write(arr.tobytes())
    if shape and rows != shape[0]:
        raise ValueError(f"{name}: wrote {rows} rows for an array of {shape[0]}")


def _write_npz(f: IO[bytes], arrays: Mapping[str, NDArray[Any]]) -> None:
    """``np.savez`` layout (stored zip of ``.npy`` files) with fixed timestamps."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            _npz_entry(zf, name, arr.shape, arr.dtype, [arr])


def _npz_bytes(arrays: Mapping[str, NDArray[Any]]) -> bytes:
    buf = io.BytesIO()
    _write_npz(buf, arrays)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> Any:
    """The JSON round trip of ``obj`` (tuples → lists, Paths → str), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _shard_name(i0: int, i1: int) -> str:
    return f"shard-{i0:08d}-{i1:08d}"


@dataclass
class ShardFiles:
    npz: Path
    traj: Path
    side: Path

    @classmethod
    def of(cls, out: Path, i0: int, i1: int) -> ShardFiles:
        d, name = out / "shards", _shard_name(i0, i1)
        return cls(d / f"{name}.npz", d / f"{name}.traj.npz", d / f"{name}.json")

    def remove(self) -> None:
        for p in (self.side, self.npz, self.traj):  # sidecar first: it is what marks "done"
            p.unlink(missing_ok=True)


def _shard_status(out: Path, i0: int, i1: int, identity_sha: str) -> tuple[str, str]:
    """(``ok`` | ``missing`` | ``corrupt``, reason) for shard [i0, i1)."""
    files = ShardFiles.of(out, i0, i1)
    if not files.side.exists():
        leftover = files.npz.exists() or files.traj.exists()
        return (
            ("corrupt", "no sidecar (interrupted while written)") if leftover else ("missing", "")
        )
    try:
        side = json.loads(files.side.read_text())
    except (OSError, ValueError) as err:
        return "corrupt", f"unreadable sidecar ({err})"
    if not isinstance(side, dict):
        return "corrupt", "sidecar is not a JSON object"
    if side.get("identity_sha256") != identity_sha:
        # The manifest matched, so this sidecar is damaged or was left by an interleaved run of
        # another configuration: regenerate the shard rather than refuse the whole run.
        return "corrupt", "sidecar of another configuration"
    if side.get("samples") != [i0, i1]:
        return "corrupt", f"sidecar range {side.get('samples')} != [{i0}, {i1}]"
    for path, key in ((files.npz, "sha256"), (files.traj, "trajectory_sha256")):
        if not path.is_file():
            return "corrupt", f"{path.name} missing"
        if sha256_file(path) != side.get(key):
            return "corrupt", f"{path.name}: checksum mismatch (truncated or modified)"
    return "ok", ""


def write_shard(
    out: Path,
    i0: int,
    i1: int,
    images: NDArray[np.uint8],
    labels: NDArray[np.int64] | None,
    traj: TrajState,
    meta: dict[str, Any],
) -> dict[str, Any]:
    files = ShardFiles.of(out, i0, i1)
    files.side.unlink(missing_ok=True)
    arrays: dict[str, NDArray[Any]] = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels
    data, tdata = _npz_bytes(arrays), _npz_bytes(traj)
    atomic_write(files.npz, lambda f: f.write(data))
    atomic_write(files.traj, lambda f: f.write(tdata))
    side = {
        "samples": [i0, i1],
        "count": i1 - i0,
        "file": files.npz.name,
        "sha256": _sha(data),
        "trajectory_file": files.traj.name,
        "trajectory_sha256": _sha(tdata),
        **meta,
    }
    atomic_write_json(files.side, side)  # last: the shard is complete once this exists
    return side


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def identity_sha256(identity: Mapping[str, Any]) -> str:
    """SHA-256 of a run identity's canonical JSON (what sidecars and the manifest store)."""
    return _sha(json.dumps(identity, sort_keys=True).encode())


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); remove it to go on") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON object; remove it to go on")
    return obj


def adopt_run_folder(out: Path) -> bool:
    """Whether ``out``, a folder without an ownership record, holds a run of an earlier fguide
    (its manifest); a manifest that is damaged or not a run's is an error naming it."""
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        return False
    if _read_json_object(manifest_path).get("format") != FORMAT:
        raise ConfigMismatchError(f"{manifest_path} is not an fguide sample run manifest")
    return True


def check_run_folder(out: Path) -> Ownership:
    """Refuse ``out`` unless a sampling run may write into it (:func:`check_folder`)."""
    return check_folder(out, KIND, RUN_FILES, adopt=adopt_run_folder)


def claim_run_folder(out: Path) -> OwnedFolder:
    """Check, lock and record ``out`` as a sampling run's folder (:func:`claim_folder`)."""
    return claim_folder(out, KIND, RUN_FILES, adopt=adopt_run_folder)


def prepare_folder(
    out: Path,
    identity: dict[str, Any],
    plan: list[tuple[int, int]],
    config: Mapping[str, Any],
    world_size: int = 1,
    log: Callable[[str], None] = lambda msg: None,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Check ``out`` against ``identity`` and mark the run ``running``.

    Refuses a folder holding files no run wrote there or another job's files
    (:func:`fguide.io.folders.check_folder`) and one holding another run
    (:class:`ConfigMismatchError`, listing what changed); returns (shards to generate, shards
    found corrupt), corrupt and missing shards having been removed. The temporary files of
    interrupted writes are removed when the folder is claimed
    (:func:`fguide.io.folders.claim_folder`).
    """
    manifest_path = out / MANIFEST
    check_run_folder(out)
    if manifest_path.exists():
        old = _read_json_object(manifest_path)
        if old.get("format") != FORMAT:
            raise ConfigMismatchError(f"{manifest_path} is not an fguide sample run manifest")
        if old.get("identity") != identity:
            changes = _diff(old.get("identity"), identity)
            raise ConfigMismatchError(
                f"{out} holds a run with a different configuration; refusing to mix samples. "
                f"Changed: {'; '.join(changes[:8])}{' …' if len(changes) > 8 else ''}. "
                "Rerun with the same settings to continue it, or use another --out."
            )
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    sha = identity_sha256(identity)
    todo, corrupt = [], []
    for i0, i1 in plan:
        status, why = _shard_status(out, i0, i1, sha)
        if status != "ok":
            if status == "corrupt":
                log(f"shard [{i0}, {i1}) is incomplete or corrupt ({why}); regenerating")
                corrupt.append((i0, i1))
            ShardFiles.of(out, i0, i1).remove()
            todo.append((i0, i1))
    manifest = {
        "format": FORMAT,
        "status": "running",
        "identity": identity,
        "identity_sha256": sha,
        "config": dict(config),
        "provenance": provenance(world_size=world_size),
    }
    atomic_write_json(manifest_path, manifest)
    return todo, corrupt


def merge_run(
    out: Path,
    plan: list[tuple[int, int]],
    identity_sha: str,
    generated_now: Iterable[tuple[int, int]],
    *,
    image_size: int,
    with_labels: bool,
    grid: int,
    manifest_extra: Mapping[str, Any],
    trajectory_run: Mapping[str, Any],
    statistics: Sequence[type[StepStatistic]] = (),
) -> Path | None:
    """Merge the complete shards of ``plan`` into ``samples.npz``, grid, trajectory, manifest.

    Every shard's sidecar must carry this run's identity and its files their checksums (a
    shard of another configuration is never merged). ``statistics``: the per-step statistics
    besides the trajectory recorder's whose curves go into ``trajectory.json``. Returns the
    samples file, or None (and the manifest says ``incomplete``) while shards are missing.
    """
    manifest_path = out / MANIFEST
    manifest = _read_json_object(manifest_path)
    sides: list[dict[str, Any] | None] = []
    for i0, i1 in plan:
        f = ShardFiles.of(out, i0, i1)
        side = _read_json_object(f.side) if f.side.exists() else None
        if side is not None and side.get("identity_sha256") != identity_sha:
            raise ConfigMismatchError(
                f"{f.side} belongs to a run with another configuration; refusing to merge it"
            )
        sides.append(side)
    missing = [p for p, s in zip(plan, sides, strict=True) if s is None]
    now = {tuple(p) for p in generated_now}
    manifest["shards"] = [
        {
            "file": f"{SHARDS}/{s['file']}",
            "samples": s["samples"],
            "sha256": s["sha256"],
            "trajectory_sha256": s["trajectory_sha256"],
            **{k: s.get(k) for k in ("rank", "world_size", "device", "batch_size", "seconds")},
            "generated_now": tuple(s["samples"]) in now,
        }
        for s in sides
        if s is not None
    ]
    manifest.update(manifest_extra)
    if missing:
        manifest["status"] = "incomplete"
        manifest["missing_shards"] = [list(p) for p in missing]
        atomic_write_json(manifest_path, manifest)
        return None

    num_samples = plan[-1][1] if plan else 0
    labels: list[NDArray[np.int64]] = []
    first: list[NDArray[np.uint8]] = []
    states: list[TrajState] = []

    def image_chunks() -> Iterator[NDArray[np.uint8]]:
        shown = 0
        for (i0, i1), side in zip(plan, sides, strict=True):
            assert side is not None
            f = ShardFiles.of(out, i0, i1)
            data, tdata = f.npz.read_bytes(), f.traj.read_bytes()
            if _sha(data) != side["sha256"] or _sha(tdata) != side["trajectory_sha256"]:
                raise ValueError(f"{f.npz}: checksum mismatch while merging; rerun to regenerate")
            if side.get("samples") != [i0, i1]:
                raise ValueError(f"{f.side}: sample range {side.get('samples')} != [{i0}, {i1}]")
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                images = z["arr_0"]
                if with_labels:
                    labels.append(z["arr_1"])
            if images.shape != (i1 - i0, image_size, image_size, 3) or images.dtype != np.uint8:
                raise ValueError(f"{f.npz}: images {images.dtype} {images.shape} unexpected")
            with np.load(io.BytesIO(tdata), allow_pickle=False) as z:
                states.append({k: z[k] for k in z.files})
            if shown < grid:
                first.append(images[: grid - shown])
                shown += len(first[-1])
            yield images

    def write(fh: IO[bytes]) -> None:
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            shape = (num_samples, image_size, image_size, 3)
            _npz_entry(zf, "arr_0", shape, np.dtype(np.uint8), image_chunks())
            if with_labels:
                _npz_entry(zf, "arr_1", (num_samples,), np.dtype(np.int64), iter(labels))

    samples = atomic_write(out / SAMPLES, write)
    if first:
        atomic_write(out / GRID, image_grid_png(np.concatenate(first)))
    traj = trajectory_dict(merge_states(states), statistics)
    traj["run"] = {**trajectory_run, "num_samples": num_samples, "identity_sha256": identity_sha}
    trajectory_path = atomic_write_json(out / TRAJECTORY, traj)
    manifest.pop("missing_shards", None)
    manifest.update(
        status="complete",
        samples={
            "file": SAMPLES,
            "sha256": sha256_file(samples),
            "images": [num_samples, image_size, image_size, 3],
            "labels": with_labels,
        },
        grid=GRID if first else None,
        trajectory=TRAJECTORY,
        trajectory_sha256=sha256_file(trajectory_path),
    )
    atomic_write_json(manifest_path, manifest)
    return samples


# -- reading a run ---------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What a run folder holds, for the commands that read runs."""

    path: Path
    status: str
    """``complete``, ``running``, ``incomplete``, or ``unknown`` (no readable manifest)."""
    samples: Path | None
    """``samples.npz`` when present."""
    trajectory: Path | None
    manifest: dict[str, Any]


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``fguide sample`` (it has a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def read_run(path: str | Path) -> RunInfo:
    """The run in folder ``path``: its status and files (a ``ValueError`` if it is none)."""
    p = Path(path)
    if not is_run_folder(p):
        raise ValueError(f"{p}: not an fguide sample run folder (no {MANIFEST})")
    manifest = _read_json_object(p / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{p / MANIFEST} is not an fguide sample run manifest")
    samples, traj = p / SAMPLES, p / TRAJECTORY
    return RunInfo(
        p,
        str(manifest.get("status", "unknown")),
        samples if samples.is_file() else None,
        traj if traj.is_file() else None,
        manifest,
    )


def check_samples(run: RunInfo, sha256: str) -> None:
    """Refuse the run's ``samples.npz`` unless ``sha256`` (its SHA-256, computed once by the
    reader) is the one the manifest of a complete run records."""
    recorded = run.manifest.get("samples")
    recorded = recorded.get("sha256") if isinstance(recorded, dict) else None
    if run.status != "complete" or run.samples is None:
        return  # nothing recorded yet: the reader warns that the run is not complete
    if sha256 != recorded:
        raise ValueError(
            f"{run.samples} is not the file {run.path / MANIFEST} records for this run (SHA-256 "
            f"{sha256[:12]}…, recorded {str(recorded)[:12]}…): it was copied in from another run "
            "or changed after the run; rerun the run's fguide sample command to rebuild it from "
            "its shards"
        )


def check_trajectory(run: RunInfo) -> Path:
    """The run's ``trajectory.json``, refused unless it is the run's own: its SHA-256 as the
    manifest records it, or (manifests of earlier versions) the run identity it repeats."""
    traj = run.trajectory
    if traj is None:
        raise FileNotFoundError(
            f"{run.path}: this fguide sample run has no {TRAJECTORY} (status {run.status!r}; "
            "it is written when the run completes)"
        )
    recorded = run.manifest.get("trajectory_sha256")
    if isinstance(recorded, str):
        same = sha256_file(traj) == recorded
    else:
        of_run = _read_json_object(traj).get("run")
        identity = of_run.get("identity_sha256") if isinstance(of_run, dict) else None
        same = identity == run.manifest.get("identity_sha256")
    if not same:
        raise ValueError(
            f"{traj} is not the {TRAJECTORY} {run.path / MANIFEST} records for this run: it was "
            "copied in from another run or changed after the run; rerun the run's fguide "
            "sample command to rebuild it"
        )
    return traj
