"""Inception features of an image batch, streamed, and their on-disk cache (METHODS.md 6).

:func:`extract_features` streams an :class:`~fguide.io.images.ImageSource` through the FID
Inception (:mod:`fguide.models.inception`): images are read in batches, the next batch is read
while the network runs, and the statistics are accumulated as the features arrive. Per image it
keeps the 2048-d ``pool`` features (precision/recall) and the 1008-way logits (Inception Score);
the 2048-d pool and the 2023-d spatial features are folded into
:class:`~fguide.metrics.fid.FeatureStats` (μ, Σ with N − 1).

:func:`cached_features` keeps a batch's features on disk, keyed by the file's sha256 and the
Inception weight file's sha256 (atomic writes; every array carries a checksum, and an unreadable
or mismatched cache file is recomputed with a warning). Cached features are float32 results of
whatever device made them: devices and batch sizes differ only by float32 round-off, far below
FID's sampling noise, so the device is recorded in the cache but is not part of its key.

On CUDA the convolutions and matmuls run in IEEE float32 (TF32 off, restored afterwards): TF32
keeps a 10-bit mantissa (rounding error 2^13 times float32's), which ADM's TF float32 graph does
not have (bench/bench_inception.py measures its effect on the features when a GPU is there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from fguide.io.files import atomic_write
from fguide.io.images import ImageSource
from fguide.metrics.fid import FeatureStats
from fguide.models.inception import FIDInception

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_VERSION",
    "LOGITS_DIM",
    "POOL_DIM",
    "SPATIAL_DIM",
    "BatchFeatures",
    "CacheStatus",
    "cache_limit_bytes",
    "cached_features",
    "default_cache_dir",
    "extract_features",
    "feature_cache_path",
    "ieee_float32",
    "prune_cache",
]

CACHE_VERSION = 2  # bump when the cached content or its meaning changes
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, 2023, 1008
CACHE_DIR_ENV = "FGUIDE_CACHE_DIR"
CACHE_MAX_ENV = "FGUIDE_CACHE_MAX_GB"
DEFAULT_CACHE_MAX_GB = 4.0
STALE_TMP_S = 3600.0  # a cache write takes seconds: an older temporary file is a leftover


# -- devices ----------------------------------------------------------------------------------


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """IEEE float32 convolutions and matmuls on CUDA for the block (TF32 off), then restore."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9 API
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:  # pragma: no cover - older torch
        legacy = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = legacy


# -- features ---------------------------------------------------------------------------------


@dataclass
class BatchFeatures:
    """Inception features of one image batch: per-image pool features and logits, and the
    streaming statistics (μ, Σ) of the pool (FID) and spatial (sFID) features."""

    pool: NDArray[np.float32]  # [N, 2048]
    logits: NDArray[np.float32]  # [N, 1008] (NaN when the weight file has no fc layer)
    pool_stats: FeatureStats
    spatial_stats: FeatureStats
    spatial: NDArray[np.float32] | None = None  # [N, 2023], kept when N <= 2 * 2023 (cache)

    @property
    def count(self) -> int:
        return int(self.pool.shape[0])


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def extract_features(
    source: ImageSource,
    model: FIDInception,
    *,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
    desc: str | None = None,
) -> BatchFeatures:
    """Stream ``source`` through the FID Inception; a tqdm bar shows images/s.

    Runs where ``model`` is, in its dtype, in IEEE float32 on CUDA. The statistics are folded in
    on a worker thread (numpy's BLAS releases the GIL), overlapping the next batch's forward.
    Non-finite features raise a ``ValueError`` naming the image (usually a broken weight file).
    """
    device = _model_device(model)
    n = source.count
    pool = np.empty((n, POOL_DIM), dtype=np.float32)
    logits = np.empty((n, LOGITS_DIM), dtype=np.float32)
    pool_stats, spatial_stats = FeatureStats(POOL_DIM), FeatureStats(SPATIAL_DIM)
    # Per-image spatial features are kept while they are smaller than their scatter matrix.
    spatial = np.empty((n, SPATIAL_DIM), np.float32) if _rows_smaller(n, SPATIAL_DIM) else None
    start = 0
    pending: list[Future[Any]] = []
    bar = tqdm(
        total=n,
        unit="img",
        desc=desc or source.path.name,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    with ieee_float32(), bar, ThreadPoolExecutor(1) as stats_worker:
        for images in source.batches(batch_size, workers):
            x = torch.from_numpy(images)
            if device.type == "cuda":
                x = x.pin_memory()
            out = model(x.to(device, non_blocking=True))
            p = out.pool.float().cpu().numpy()
            s = out.spatial.float().cpu().numpy()
            end = start + p.shape[0]
            bad = ~(np.isfinite(p).all(axis=1) & np.isfinite(s).all(axis=1))
            if bad.any():
                idx = start + np.flatnonzero(bad)
                raise ValueError(
                    f"non-finite Inception features for {len(idx)} image(s), first "
                    f"{source.name(int(idx[0]))}: check the Inception weight file"
                )
            pool[start:end] = p
            logits[start:end] = out.logits.float().cpu().numpy()
            if spatial is not None:
                spatial[start:end] = s
            pending.append(stats_worker.submit(pool_stats.update, p))
            pending.append(stats_worker.submit(spatial_stats.update, s))
            bar.update(p.shape[0])
            start = end
        for fut in pending:
            fut.result()  # re-raises a worker's error
    if start != n:
        raise ValueError(f"{source.path}: expected {n} images, read {start}")
    return BatchFeatures(pool, logits, pool_stats, spatial_stats, spatial)


def _rows_smaller(n: int, dim: int) -> bool:
    """Whether n float32 rows of ``dim`` take less room than a float64 dim × dim scatter."""
    return n <= 2 * dim


# -- the feature cache ------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$FGUIDE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fguide/inception-features``, else
    ``~/.cache/fguide/inception-features``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "fguide" / "inception-features"


def feature_cache_path(
    cache_dir: str | os.PathLike[str], file_sha256: str, weights_sha256: str, dtype: torch.dtype
) -> Path:
    """Where the features of the file with ``file_sha256`` under those weights are cached."""
    dt = str(dtype).removeprefix("torch.")
    name = f"{file_sha256[:24]}-inception-{weights_sha256[:12]}-{dt}-v{CACHE_VERSION}.npz"
    return Path(cache_dir) / name


def cache_limit_bytes() -> int:
    """The cache's size bound: ``$FGUIDE_CACHE_MAX_GB`` gigabytes (default 4; each reference
    batch takes ~70 MB, mostly its two 2048² float64 scatter matrices)."""
    text = os.environ.get(CACHE_MAX_ENV, "").strip()
    try:
        gb = float(text) if text else DEFAULT_CACHE_MAX_GB
    except ValueError:
        msg = f"${CACHE_MAX_ENV}: expected a number of gigabytes, got {text!r}"
        raise ValueError(msg) from None
    if not gb >= 0:
        raise ValueError(f"${CACHE_MAX_ENV}: must be >= 0, got {text!r}")
    return int(gb * 1e9)


# What the cache writes, named by the checksums that key it: a user's file of another name in
# a --cache-dir folder is never pruned, nor a temporary file not of this naming.
_CACHE_NAME = r"[0-9a-f]{24}-inception-[0-9a-f]{12}-[a-z0-9]+-v[0-9]+\.npz"
_CACHE_FILE = re.compile(_CACHE_NAME)
_CACHE_TEMP = re.compile(rf"\.{_CACHE_NAME}\.[A-Za-z0-9_-]+\.tmp")


def prune_cache(
    cache_dir: str | os.PathLike[str], max_bytes: int, keep: Path | None = None
) -> list[Path]:
    """Delete the least recently used cache files until the folder's cache files total at most
    ``max_bytes`` (``keep``, the file just used, is never deleted), and temporary files of
    writes cut short more than an hour ago. Only names of the cache's own making
    (:func:`feature_cache_path`, checksums included) are touched. Returns the deleted files."""
    folder = Path(cache_dir)
    removed = []
    now = time.time()
    for tmp in folder.glob(".*-inception-*.npz.*.tmp"):
        if not _CACHE_TEMP.fullmatch(tmp.name):
            continue
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
                removed.append(tmp)
    entries = []
    for f in folder.glob("*-inception-*.npz"):
        if not _CACHE_FILE.fullmatch(f.name):
            continue
        with contextlib.suppress(OSError):
            st = f.stat()
            entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    for _, size, f in sorted(entries, key=lambda e: e[0]):  # oldest use first
        if total <= max_bytes:
            break
        if keep is not None and f == keep:
            continue
        with contextlib.suppress(OSError):
            f.unlink()
            removed.append(f)
            total -= size
    return removed


def _array_sha256(a: NDArray[Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _cache_arrays(f: BatchFeatures) -> dict[str, NDArray[Any]]:
    """What a cache file holds: the per-image pool features and logits, and for the pool and
    spatial statistics either the per-image rows they are computed from (while smaller than
    the scatter matrix: a reference of a few images takes kilobytes, not 66 MB) or (μ, M)."""
    out: dict[str, NDArray[Any]] = {"pool": f.pool, "logits": f.logits}
    for name, st, rows in (("pool", f.pool_stats, f.pool), ("spatial", f.spatial_stats, f.spatial)):
        if rows is not None and _rows_smaller(f.count, rows.shape[1]):
            if name == "spatial":
                out["spatial"] = rows
            continue
        state = st.state_dict()
        out[f"{name}_mean"] = np.asarray(state["mean"], dtype=np.float64)
        out[f"{name}_scatter"] = np.asarray(state["scatter"], dtype=np.float64)
    return out


def _save_cache(path: Path, feats: BatchFeatures, key: Mapping[str, Any]) -> None:
    arrays = _cache_arrays(feats)
    meta = {**key, "count": feats.count, "sha256": {k: _array_sha256(a) for k, a in arrays.items()}}
    savez: Callable[..., None] = np.savez
    atomic_write(path, lambda f: savez(f, meta=np.array(json.dumps(meta)), **arrays))


def _load_cache(path: Path, key: Mapping[str, Any]) -> BatchFeatures:
    """Read and verify a cache file; any problem raises ValueError with the reason."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k != "meta"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256", {}), dict):
        raise ValueError(f"its 'meta' is not a JSON object with checksums ({type(meta).__name__})")
    for k, v in key.items():
        if meta.get(k) != v:
            raise ValueError(f"made for {k} = {meta.get(k)!r}, not {v!r}")
    sums = meta.get("sha256", {})
    allowed = {"pool", "logits", "spatial"} | {
        f"{name}_{part}" for name in ("pool", "spatial") for part in ("mean", "scatter")
    }
    if not {"pool", "logits"} <= set(arrays) <= allowed or set(sums) != set(arrays):
        raise ValueError(f"arrays {sorted(arrays)}, checksums of {sorted(sums)}")
    for k, a in arrays.items():
        if _array_sha256(a) != sums[k]:
            raise ValueError(f"checksum mismatch in '{k}'")
    n = int(meta["count"])
    if arrays["pool"].shape != (n, POOL_DIM) or arrays["logits"].shape != (n, LOGITS_DIM):
        raise ValueError("feature arrays have the wrong shape")

    def stats(name: str, d: int) -> FeatureStats:
        if f"{name}_scatter" in arrays and f"{name}_mean" in arrays:
            st = FeatureStats.from_state_dict(
                {"count": n, "mean": arrays[f"{name}_mean"], "scatter": arrays[f"{name}_scatter"]}
            )
        elif name in arrays and arrays[name].shape == (n, d):
            # The rows in their order: FeatureStats folds fixed blocks of rows, so this gives
            # the very (μ, M) the streaming job computed, whatever its batch size.
            st = FeatureStats(d).update(arrays[name])
        else:
            raise ValueError(f"no {name} statistics (neither rows [{n}, {d}] nor mean and scatter)")
        if st.dim != d:
            raise ValueError(f"{name} statistics have dimension {st.dim}, not {d}")
        return st

    spatial = arrays.get("spatial")
    return BatchFeatures(
        arrays["pool"].astype(np.float32, copy=False),
        arrays["logits"].astype(np.float32, copy=False),
        stats("pool", POOL_DIM),
        stats("spatial", SPATIAL_DIM),
        None if spatial is None else spatial.astype(np.float32, copy=False),
    )


CacheStatus = Literal["hit", "miss", "recomputed", "disabled"]


def cached_features(
    source: ImageSource,
    model: FIDInception,
    *,
    file_sha256: str,
    weights_sha256: str,
    cache_dir: str | os.PathLike[str] | None,
    warn: Callable[[str], None] | None = None,
    **extract_kwargs: Any,
) -> tuple[BatchFeatures, CacheStatus, Path | None]:
    """:func:`extract_features`, through the on-disk cache when ``cache_dir`` is given.

    Returns the features, ``"hit"``, ``"miss"`` (computed and stored), ``"recomputed"`` (the
    cache file was corrupt or stale: a warning says why) or ``"disabled"``, and the cache path.
    """
    if cache_dir is None:
        return extract_features(source, model, **extract_kwargs), "disabled", None
    dtype = next(model.parameters()).dtype
    path = feature_cache_path(cache_dir, file_sha256, weights_sha256, dtype)
    key = {
        "cache_version": CACHE_VERSION,
        "file_sha256": file_sha256,
        "weights_sha256": weights_sha256,
        "dtype": str(dtype),
    }
    status: CacheStatus = "miss"
    if path.is_file():
        try:
            feats = _load_cache(path, key)
            with contextlib.suppress(OSError):
                os.utime(path)  # its modification time records the last use (least recently used)
            return feats, "hit", path
        except ValueError as err:
            msg = f"feature cache {path} for {source.path} is invalid ({err}); recomputing"
            (warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3)))(msg)
            status = "recomputed"
    feats = extract_features(source, model, **extract_kwargs)
    try:
        _save_cache(path, feats, {**key, "device": str(_model_device(model))})
    except OSError as err:  # a read-only or full cache folder must not lose the results
        msg = f"could not write the feature cache {path} ({err}); continuing without it"
        (warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3)))(msg)
        return feats, "disabled", None
    prune_cache(path.parent, cache_limit_bytes(), keep=path)
    return feats, status, path
