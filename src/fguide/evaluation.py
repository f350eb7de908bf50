"""ADM-comparable evaluation: FID, sFID, Inception Score, precision/recall from image files.

METHODS.md section 6. A reference batch R and a sample batch S (ADM ``.npz`` files or folders of
PNG/JPEG images) go through the FID Inception (:mod:`fguide.models.inception`) as a streaming
job: images are read in batches (``arr_0`` straight out of the zip, never loaded whole; folder
images decoded by a thread pool), the next batch is read while the network runs, and the
statistics are accumulated as the features arrive. Per image the job keeps the 2048-d ``pool``
features (precision/recall) and the 1008-way logits (Inception Score); the 2048-d pool and the
2023-d spatial features are folded into :class:`~fguide.metrics.fid.FeatureStats` (μ, Σ with
N − 1). Then, with ADM's definitions:

- FID = ‖μ_S − μ_R‖² + tr Σ_S + tr Σ_R − 2 tr sqrt(Σ_S Σ_R) on the pool features, sFID the
  same on the spatial ones. μ_R, Σ_R come from the reference file's ``mu``/``sigma``
  (``mu_s``/``sigma_s`` for sFID) when it has them, as ADM does, else from its images;
- IS over consecutive splits of 5000 sample logits;
- precision/recall with k = 3 between the reference images' and the samples' pool features.

The reference batch's features are cached on disk, keyed by the reference file's sha256 and the
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
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from fguide.io.files import atomic_write, sha256_file
from fguide.io.images import IMAGE_SUFFIXES, ImageFolder, center_crop_arr, list_images, load_image
from fguide.metrics.fid import FeatureStats, FIDComparabilityWarning, frechet_distance
from fguide.metrics.inception_score import inception_score_splits
from fguide.metrics.precision_recall import DistanceMode, precision_recall
from fguide.models.inception import INCEPTION_WEIGHTS_ENV, FIDInception, load_fid_inception
from fguide.runtime import resolve_device

__all__ = [
    "EVALUATOR_VERSION",
    "BatchFeatures",
    "EvaluationResult",
    "EvaluationWarning",
    "ImageSource",
    "cached_features",
    "default_cache_dir",
    "evaluate",
    "extract_features",
    "feature_cache_path",
    "open_images",
    "read_reference_statistics",
]

#: Identifies the definitions behind the numbers (recorded in ``metrics.json``).
EVALUATOR_VERSION = (
    "fguide-evaluator 1 (ADM evaluator definitions, openai/guided-diffusion 22e0df8; "
    "TF 2015-12-05 Inception, TF1 bilinear resize)"
)
CACHE_VERSION = 1  # bump when the cached content or its meaning changes
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, 2023, 1008
STANDARD_SAMPLE_COUNT = 50_000  # ADM / the paper: 50k samples (FID is biased in N)
STANDARD_REF_COUNT = 10_000  # ADM's reference batches: 10k images in arr_0
IS_SPLIT_SIZE = 5000
PR_K = 3
STAT_KEYS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}
STAT_DIMS = {"fid": POOL_DIM, "sfid": SPATIAL_DIM}
CACHE_DIR_ENV = "FGUIDE_CACHE_DIR"
SAMPLING_RUN_FILE = "samples.npz"  # what `fguide sample` writes at the top of its folder

T = TypeVar("T")


class EvaluationWarning(UserWarning):
    """Input that can be evaluated but whose numbers need care (sizes, counts, rank)."""


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


# -- image sources ----------------------------------------------------------------------------


def _npy_header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            return fmt.read_array_header_1_0(f)
        if version == (2, 0):
            return fmt.read_array_header_2_0(f)
    except ValueError as err:
        raise ValueError(f"{where}: not a valid .npy array ({err})") from None
    raise ValueError(f"{where}: unsupported .npy format version {version}")


def _read_ahead(it: Iterator[T]) -> Iterator[T]:
    """``it``'s items, the next one produced in a background thread while the caller works."""
    done = object()
    try:
        with ThreadPoolExecutor(1) as ex:
            fut: Future[Any] = ex.submit(next, it, done)
            while True:
                item = fut.result()
                if item is done:
                    return
                fut = ex.submit(next, it, done)
                yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True, eq=False)
class ImageSource:
    """A batch of images on disk: an ADM ``.npz`` (``arr_0``) or a folder of image files.

    ``size`` is (H, W) of every image (checked when the source is opened), ``labels`` the
    ``arr_1`` labels or, for a folder of class subfolders, the index of the sorted class name.
    ``crop``: folder images are centre-cropped to crop × crop as ADM prepares ImageNet.
    """

    path: Path
    kind: Literal["npz", "folder"]
    count: int
    size: tuple[int, int]
    labels: NDArray[np.int64] | None = None
    keys: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    crop: int | None = None
    fortran_order: bool = False

    def describe(self, index: int) -> str:
        """A human name for image ``index`` (for error messages)."""
        if self.kind == "folder":
            return str(self.files[index])
        return f"{self.path}['arr_0'][{index}]"

    def batches(self, batch_size: int, workers: int = 4) -> Iterator[NDArray[np.uint8]]:
        """uint8 NHWC batches in order, the next one read while the caller uses the current."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.kind == "npz":
            return _read_ahead(self._npz_batches(batch_size))
        return _read_ahead(self._folder(batch_size, workers))

    def _npz_batches(self, batch_size: int) -> Iterator[NDArray[np.uint8]]:
        h, w = self.size
        if self.fortran_order:  # rare (saved from a transposed view): no row streaming
            with np.load(self.path, allow_pickle=False) as data:
                arr = data["arr_0"]
            for s in range(0, self.count, batch_size):
                yield np.ascontiguousarray(arr[s : s + batch_size])
            return
        row = h * w * 3
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
                _npy_header(f, f"{self.path}['arr_0']")
                for s in range(0, self.count, batch_size):
                    k = min(batch_size, self.count - s)
                    chunk = f.read(k * row)  # exactly k rows unless the member ends early
                    if len(chunk) != k * row:
                        raise ValueError(
                            f"{self.path}['arr_0'] is truncated: {s + len(chunk) // row} of "
                            f"{self.count} images readable"
                        )
                    # A copy: torch wants writable memory, the bytes object is read-only.
                    yield np.frombuffer(chunk, dtype=np.uint8).reshape(k, h, w, 3).copy()
        except zipfile.BadZipFile as err:  # e.g. a CRC mismatch at the end of arr_0
            raise ValueError(f"{self.path}: corrupt npz file ({err})") from None

    def _load(self, path: Path) -> NDArray[np.uint8]:
        if self.crop is None:
            return load_image(path)
        try:
            with Image.open(path) as im:
                return center_crop_arr(im.convert("RGB"), self.crop)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None

    def _folder(self, batch_size: int, workers: int) -> Iterator[NDArray[np.uint8]]:
        # PIL releases the GIL while decoding, so threads decode in parallel.
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for s in range(0, self.count, batch_size):
                files = self.files[s : s + batch_size]
                images = list(pool.map(self._load, files))
                for p, im in zip(files, images, strict=True):
                    if im.shape[:2] != self.size:
                        raise ValueError(
                            f"{p} is {im.shape[0]}x{im.shape[1]} but {self.files[0]} is "
                            f"{self.size[0]}x{self.size[1]}: a folder's images must share one size"
                        )
                yield np.stack(images)


def _npz_labels(path: Path, count: int) -> NDArray[np.int64]:
    try:
        with np.load(path, allow_pickle=False) as data:
            y = data["arr_1"]
    except ValueError as err:
        raise ValueError(f"{path}['arr_1']: cannot be read ({err})") from None
    if y.ndim != 1 or y.shape[0] != count or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{path}['arr_1'] must hold {count} integer labels (one per image of arr_0); "
            f"got {y.dtype} {list(y.shape)}"
        )
    return y.astype(np.int64)


def _open_npz(path: Path) -> ImageSource:
    try:
        with zipfile.ZipFile(path) as zf:
            keys = tuple(n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy"))
            if "arr_0" not in keys:
                hint = ""
                if {"mu", "sigma"} <= set(keys):
                    hint = (
                        " (statistics alone are not enough: precision/recall need the "
                        "reference images, as in ADM's reference batches)"
                    )
                raise ValueError(
                    f"{path}: no 'arr_0' (images, uint8 [N, H, W, 3]); its keys are "
                    f"{list(keys)}{hint}"
                )
            with zf.open("arr_0.npy") as f:
                shape, fortran, dtype = _npy_header(f, f"{path}['arr_0']")
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not an .npz file (not a zip archive)") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{path}['arr_0'] must be uint8 [N, H, W, 3] (ADM's layout); got {dtype} {list(shape)}"
        )
    labels = _npz_labels(path, shape[0]) if "arr_1" in keys else None
    return ImageSource(
        path,
        "npz",
        int(shape[0]),
        (int(shape[1]), int(shape[2])),
        labels,
        keys,
        fortran_order=bool(fortran),
    )


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return h, w


def _open_folder(path: Path, image_size: int | None) -> ImageSource:
    files = list_images(path)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    labels = None
    if all(len(p.relative_to(path).parts) == 2 for p in files):
        # root/<class>/<image>: labels are the sorted class folders' indices (ADM's numbering).
        tree = ImageFolder.scan(path)
        files = [p for p, _ in tree.samples]
        labels = np.array([k for _, k in tree.samples], dtype=np.int64)
    if image_size is not None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        size = (image_size, image_size)
    else:
        size = _image_size(files[0])
        for p in files[1:]:
            if (s := _image_size(p)) != size:
                raise ValueError(
                    f"{path}: images of different sizes ({files[0].name} is {size[0]}x{size[1]}, "
                    f"{p.relative_to(path)} is {s[0]}x{s[1]}); resize them first, or centre-crop "
                    "them ADM-style with an image size"
                )
    return ImageSource(
        path, "folder", len(files), size, labels, files=tuple(files), crop=image_size
    )


def open_images(path: str | os.PathLike[str], image_size: int | None = None) -> ImageSource:
    """Open an ADM ``.npz`` batch or an image folder (recursively; class subfolders give labels).

    Checks cheap things up front, so that a long job does not fail at its end: the npz keys,
    ``arr_0``'s dtype and shape (from the array header: no pixels are read), ``arr_1``'s length;
    for a folder, that every image is readable and (unless ``image_size`` crops them) of one
    size. ``image_size`` applies to folders only. A folder holding ``samples.npz`` is an
    ``fguide sample`` run: its ``samples.npz`` is opened.
    """
    p = Path(path)
    if p.is_dir() and (p / SAMPLING_RUN_FILE).is_file():
        return _open_npz(p / SAMPLING_RUN_FILE)  # a `fguide sample` run folder (not grid.png)
    if p.is_dir():
        return _open_folder(p, image_size)
    if not p.is_file():
        raise FileNotFoundError(f"no such file or folder: {p}")
    return _open_npz(p)


# -- reference statistics ---------------------------------------------------------------------


def read_reference_statistics(
    path: str | os.PathLike[str],
) -> dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]]:
    """Precomputed (μ, Σ) of a reference npz: {"fid": (mu, sigma), "sfid": (mu_s, sigma_s)}.

    Either pair may be absent (then those statistics are computed from ``arr_0``); half a pair,
    a wrong shape or a non-finite value is an error naming the file and the key.
    """
    p = Path(path)
    if p.is_dir():
        return {}
    out: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}
    with np.load(p, allow_pickle=False) as data:
        keys = set(data.files)
        for metric, (mk, sk) in STAT_KEYS.items():
            if mk not in keys and sk not in keys:
                continue
            if mk not in keys or sk not in keys:
                have, miss = (mk, sk) if mk in keys else (sk, mk)
                raise ValueError(f"{p}: has '{have}' but no '{miss}' (the {metric} statistics)")
            d = STAT_DIMS[metric]
            try:
                mu, sigma = data[mk], data[sk]
            except ValueError as err:
                raise ValueError(f"{p}: cannot read '{mk}'/'{sk}' ({err})") from None
            for key, arr, shape in ((mk, mu, (d,)), (sk, sigma, (d, d))):
                if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating):
                    raise ValueError(
                        f"{p}['{key}'] must be a float array of shape {list(shape)}; got "
                        f"{arr.dtype} {list(arr.shape)}"
                    )
                if not np.isfinite(arr).all():
                    raise ValueError(f"{p}['{key}'] contains non-finite values")
            out[metric] = (mu.astype(np.float64), sigma.astype(np.float64))
    return out


# -- features ---------------------------------------------------------------------------------


@dataclass
class BatchFeatures:
    """Inception features of one image batch: per-image pool features and logits, and the
    streaming statistics (μ, Σ) of the pool (FID) and spatial (sFID) features."""

    pool: NDArray[np.float32]  # [N, 2048]
    logits: NDArray[np.float32]  # [N, 1008] (NaN when the weight file has no fc layer)
    pool_stats: FeatureStats
    spatial_stats: FeatureStats

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
                    f"{source.describe(int(idx[0]))}: check the Inception weight file"
                )
            pool[start:end] = p
            logits[start:end] = out.logits.float().cpu().numpy()
            pending.append(stats_worker.submit(pool_stats.update, p))
            pending.append(stats_worker.submit(spatial_stats.update, s))
            bar.update(p.shape[0])
            start = end
        for fut in pending:
            fut.result()  # re-raises a worker's error
    if start != n:
        raise ValueError(f"{source.path}: expected {n} images, read {start}")
    return BatchFeatures(pool, logits, pool_stats, spatial_stats)


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


def _array_sha256(a: NDArray[Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _cache_arrays(f: BatchFeatures) -> dict[str, NDArray[Any]]:
    out: dict[str, NDArray[Any]] = {"pool": f.pool, "logits": f.logits}
    for name, st in (("pool", f.pool_stats), ("spatial", f.spatial_stats)):
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
    for k, v in key.items():
        if meta.get(k) != v:
            raise ValueError(f"made for {k} = {meta.get(k)!r}, not {v!r}")
    sums = meta.get("sha256", {})
    expected = {"pool", "logits", "pool_mean", "pool_scatter", "spatial_mean", "spatial_scatter"}
    if set(arrays) != expected or set(sums) != expected:
        raise ValueError(f"arrays {sorted(arrays)} instead of {sorted(expected)}")
    for k, a in arrays.items():
        if _array_sha256(a) != sums[k]:
            raise ValueError(f"checksum mismatch in '{k}'")
    n = int(meta["count"])
    if arrays["pool"].shape != (n, POOL_DIM) or arrays["logits"].shape != (n, LOGITS_DIM):
        raise ValueError("feature arrays have the wrong shape")

    def stats(name: str, d: int) -> FeatureStats:
        st = FeatureStats.from_state_dict(
            {"count": n, "mean": arrays[f"{name}_mean"], "scatter": arrays[f"{name}_scatter"]}
        )
        if st.dim != d:
            raise ValueError(f"{name} statistics have dimension {st.dim}, not {d}")
        return st

    return BatchFeatures(
        arrays["pool"].astype(np.float32, copy=False),
        arrays["logits"].astype(np.float32, copy=False),
        stats("pool", POOL_DIM),
        stats("spatial", SPATIAL_DIM),
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
            return _load_cache(path, key), "hit", path
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
    return feats, status, path


# -- evaluation -------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """What ``fguide evaluate`` reports; :meth:`to_dict` is ``metrics.json`` (less provenance)."""

    metrics: dict[str, float | None]
    inception_score_splits: list[float]
    reference: dict[str, Any]
    samples: dict[str, Any]
    inception: dict[str, Any]
    settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    comparison: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluator": EVALUATOR_VERSION,
            "metrics": self.metrics,
            "inception_score_splits": self.inception_score_splits,
            "reference": self.reference,
            "samples": self.samples,
            "inception": self.inception,
            "settings": self.settings,
            "warnings": self.warnings,
            "comparison": self.comparison,
        }


def _resolve_weights(weights: str | os.PathLike[str] | None) -> Path:
    if weights is not None:
        return Path(os.fspath(weights))
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        return Path(env)
    # Raises FileNotFoundError saying which file is needed and where it is published.
    load_fid_inception(None)
    raise AssertionError("unreachable")


def _source_info(src: ImageSource, sha: str | None) -> dict[str, Any]:
    return {
        "path": str(src.path),
        "kind": src.kind,
        "sha256": sha,
        "num_images": src.count,
        "image_size": list(src.size),
        "keys": list(src.keys) if src.kind == "npz" else None,
        "has_labels": src.labels is not None,
    }


def _load_comparison(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--compare file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a metrics.json written by fguide evaluate")
    for key in ("metrics", "samples", "reference"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{path}: no '{key}' section (not a metrics.json of fguide evaluate)")
    if not isinstance(data["samples"].get("num_images"), int):
        raise ValueError(f"{path}: no 'samples.num_images' (the sample count is needed)")
    return data


def evaluate(
    reference: str | os.PathLike[str],
    samples: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    compare: str | os.PathLike[str] | None = None,
    pr_mode: DistanceMode = "float32",
    workers: int = 4,
    progress: bool = True,
) -> EvaluationResult:
    """FID, sFID, Inception Score and precision/recall of ``samples`` against ``reference``.

    ``reference``/``samples``: ADM ``.npz`` batches or image folders. ``weights``: the FID
    Inception weight file (default ``$FGUIDE_INCEPTION_WEIGHTS``). ``batch_size`` defaults to
    64 on the CPU (ADM's) and 256 on a GPU; it changes the numbers only by float32 round-off.
    ``cache_dir`` enables the reference-feature cache. ``compare``: a previous
    ``metrics.json``, to be warned when its numbers are not comparable with these (sample
    count, reference, weights).

    Problems with the input are errors naming the file and key; things that make the numbers
    hard to compare or unreliable are warnings (also listed in the result): sample counts
    other than the standard 50k, a reference other than 10k images, fewer images than the
    feature dimension (rank-deficient covariances), references and samples of different
    image sizes, a comparison with a different sample count.
    """
    notes: list[str] = []

    def warn(msg: str, category: type[Warning] = EvaluationWarning) -> None:
        notes.append(msg)
        warnings.warn(msg, category, stacklevel=3)

    dev = resolve_device(device)
    bs = batch_size or (256 if dev.type == "cuda" else 64)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")
    weights_path = _resolve_weights(weights)
    compare_path = Path(compare) if compare is not None else None
    comparison = _load_comparison(compare_path) if compare_path is not None else None
    ref_src, sam_src = open_images(reference), open_images(samples)
    file_stats = read_reference_statistics(ref_src.path) if ref_src.kind == "npz" else {}
    for src, what in ((ref_src, "reference"), (sam_src, "sample")):
        if src.count < 2:
            raise ValueError(
                f"{src.path}: {src.count} {what} image(s); FID's covariance needs at least 2"
            )
    if ref_src.size != sam_src.size:
        warn(
            f"reference images are {ref_src.size[0]}x{ref_src.size[1]} but samples are "
            f"{sam_src.size[0]}x{sam_src.size[1]}: the resize to 299x299 then differs between "
            "them and enters the metrics (ADM compares batches of one resolution)"
        )
    if sam_src.count != STANDARD_SAMPLE_COUNT:
        warn(
            f"{sam_src.path} holds {sam_src.count} samples, not the standard "
            f"{STANDARD_SAMPLE_COUNT}: FID is biased in N, so compare these numbers only with "
            f"FIDs computed on {sam_src.count} samples",
            FIDComparabilityWarning,
        )
    if ref_src.count != STANDARD_REF_COUNT:
        warn(
            f"{ref_src.path} holds {ref_src.count} reference images, not ADM's "
            f"{STANDARD_REF_COUNT}: precision/recall (and FID from the images) depend on it"
        )
    if comparison is not None:
        n_other = comparison["samples"]["num_images"]
        if n_other != sam_src.count:
            warn(
                f"{compare_path} was computed on {n_other} samples, this run on {sam_src.count}: "
                "FIDs computed on different sample counts are not comparable (FID is biased "
                "in N)",
                FIDComparabilityWarning,
            )

    # The model first: a missing or wrong weight file fails before any long checksum.
    model = load_fid_inception(weights_path, dev, torch.float32, require_logits=False)
    weights_sha = sha256_file(weights_path)
    ref_sha = sha256_file(ref_src.path) if ref_src.kind == "npz" else None
    sam_sha = sha256_file(sam_src.path) if sam_src.kind == "npz" else None
    extract: dict[str, Any] = {"batch_size": bs, "workers": workers, "progress": progress}
    if ref_sha is not None:
        ref_feats, cache_status, cache_path = cached_features(
            ref_src,
            model,
            file_sha256=ref_sha,
            weights_sha256=weights_sha,
            cache_dir=cache_dir,
            warn=lambda m: warn(m, RuntimeWarning),
            desc="reference",
            **extract,
        )
    else:  # a folder has no single checksum to key a cache with
        ref_feats, cache_status, cache_path = (
            extract_features(ref_src, model, desc="reference", **extract),
            "disabled",
            None,
        )
    sam_feats = extract_features(sam_src, model, desc="samples", **extract)

    # FID and sFID: the reference file's statistics when present (ADM), else its images'.
    metrics: dict[str, float | None] = {}
    sources: dict[str, dict[str, str]] = {}
    file_vs_images: dict[str, float] = {}
    for metric, r_stats, s_stats in (
        ("fid", ref_feats.pool_stats, sam_feats.pool_stats),
        ("sfid", ref_feats.spatial_stats, sam_feats.spatial_stats),
    ):
        d = STAT_DIMS[metric]
        if metric in file_stats:
            mu_r, sigma_r = file_stats[metric]
            keys = STAT_KEYS[metric]
            sources[metric] = {"reference": f"file ({keys[0]}, {keys[1]})", "samples": "computed"}
            # Information: how far the file's statistics are from those of its own arr_0.
            file_vs_images[metric] = frechet_distance(r_stats.mean, r_stats.cov, mu_r, sigma_r)
        else:
            mu_r, sigma_r = r_stats.mean, r_stats.cov
            sources[metric] = {
                "reference": f"computed from {ref_src.count} images",
                "samples": "computed",
            }
            if ref_src.count <= d:
                warn(_rank_msg(ref_src, metric, d))
        if sam_src.count <= d:
            warn(_rank_msg(sam_src, metric, d))
        metrics[metric] = frechet_distance(s_stats.mean, s_stats.cov, mu_r, sigma_r)

    # Inception Score on the samples' 1008-way logits, splits of 5000 (ADM).
    split_scores: list[float] = []
    if np.isfinite(sam_feats.logits).all():
        score = inception_score_splits(sam_feats.logits, IS_SPLIT_SIZE)
        metrics["inception_score"] = score.score
        split_scores = score.split_scores
    else:
        metrics["inception_score"] = None
        warn(f"{weights_path} has no fc layer (pytorch-fid's wrapper file): no Inception Score")

    # Precision/recall (k = 3) of the sample pool features against the reference images'.
    if min(ref_feats.count, sam_feats.count) > PR_K:
        pr = precision_recall(ref_feats.pool, sam_feats.pool, k=PR_K, mode=pr_mode, device=dev)
        metrics["precision"], metrics["recall"] = pr.precision, pr.recall
    else:
        metrics["precision"] = metrics["recall"] = None
        warn(f"precision/recall with k = {PR_K} need at least {PR_K + 1} images per set: skipped")

    reference_info = _source_info(ref_src, ref_sha)
    reference_info.update(
        statistics={m: s["reference"] for m, s in sources.items()},
        file_statistics_vs_images=file_vs_images or None,
        cache=cache_status,
        cache_path=str(cache_path) if cache_path else None,
    )
    samples_info = _source_info(sam_src, sam_sha)
    samples_info["statistics"] = {m: s["samples"] for m, s in sources.items()}
    comp = None
    if comparison is not None and compare_path is not None:
        comp = _compare(compare_path, comparison, ref_sha, weights_sha, warn)
    return EvaluationResult(
        metrics={k: metrics[k] for k in ("inception_score", "fid", "sfid", "precision", "recall")},
        inception_score_splits=split_scores,
        reference=reference_info,
        samples=samples_info,
        inception={
            "weights_path": str(weights_path),
            "weights_sha256": weights_sha,
            "dtype": "float32",
            "device": str(dev),
            "tf32": False,
        },
        settings={
            "batch_size": bs,
            "is_split_size": IS_SPLIT_SIZE,
            "pr_k": PR_K,
            "pr_mode": pr_mode,
            "fid_trace": "exact (symmetric eigendecomposition, METHODS.md 6)",
        },
        warnings=notes,
        comparison=comp,
    )


def _rank_msg(src: ImageSource, metric: str, d: int) -> str:
    name = {"fid": "FID", "sfid": "sFID"}[metric]
    return (
        f"{src.path}: {src.count} images for {d}-d features: the covariance is rank-deficient "
        f"(rank <= {src.count - 1} < {d}), so {name} is strongly biased and noisy at this size; "
        "use more images than the feature dimension"
    )


def _compare(
    path: Path,
    other: dict[str, Any],
    ref_sha: str | None,
    weights_sha: str,
    warn: Callable[[str], None],
) -> dict[str, Any]:
    o_ref = other["reference"].get("sha256")
    if ref_sha and o_ref and o_ref != ref_sha:
        warn(f"{path} was computed against a different reference batch (sha256 {o_ref[:12]}…)")
    o_w = other.get("inception", {}).get("weights_sha256")
    if o_w and weights_sha and o_w != weights_sha:
        warn(f"{path} was computed with different Inception weights (sha256 {o_w[:12]}…)")
    if other.get("evaluator") != EVALUATOR_VERSION:
        warn(f"{path} comes from another evaluator version: {other.get('evaluator')!r}")
    return {
        "path": str(path),
        "num_samples": other["samples"]["num_images"],
        "metrics": other["metrics"],
    }
