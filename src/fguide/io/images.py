"""Image files: the one image-source type of fguide (ADM ``.npz`` batches, image folders, arrays).

Conventions (DESIGN.md): uint8 NHWC RGB at the file boundary; the library works on NCHW
tensors in [-1, 1]. Labels of a class-subfolder tree are the indices of the sorted folder names,
which is how ADM numbers ImageNet's 1000 synsets.

:func:`open_images` is the one entry point. It returns an :class:`ImageSource`, which every job
reads through: ``fguide evaluate`` and ``fguide calibration`` stream it in order
(:meth:`ImageSource.batches`: an npz's ``arr_0`` is read row block by row block straight out of
the zip, never loaded whole; folder images are decoded by a thread pool), ``fguide finetune``
reads it at random (:meth:`ImageSource.raw`: an npz's ``arr_0`` is memory-mapped where the zip
stores it uncompressed, as ``np.savez`` does). :meth:`ImageSource.fingerprint` identifies the
content (a SHA-256 of the bytes, computed once per source).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from fguide.io.files import sha256_file

if TYPE_CHECKING:
    from fguide.io.runs import RunInfo

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageSource",
    "center_crop_arr",
    "from_arrays",
    "from_uint8_nhwc",
    "list_images",
    "load_image",
    "open_images",
    "random_crop_arr",
    "resize_short_side",
    "scan_class_folders",
    "to_uint8_nhwc",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")
SourceKind = Literal["npz", "folder", "arrays"]
T = TypeVar("T")


# -- single images and ADM's preprocessing ----------------------------------------------------


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by suffix, case-insensitive), in sorted order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES)


def _open_rgb(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def load_image(path: str | Path) -> NDArray[np.uint8]:
    """An image file as uint8 RGB [H, W, 3]; a clear error names an unreadable file."""
    return np.asarray(_open_rgb(path), dtype=np.uint8)


def resize_short_side(image: Image.Image, short: int) -> NDArray[np.uint8]:
    """ADM's resize: halve with BOX while the short side ≥ 2·short, then BICUBIC-resize the
    short side to ``short`` (uint8 RGB [H, W, 3])."""
    while min(*image.size) >= 2 * short:
        w, h = image.size
        image = image.resize((w // 2, h // 2), resample=Image.Resampling.BOX)
    scale = short / min(*image.size)
    w, h = image.size
    image = image.resize((round(w * scale), round(h * scale)), resample=Image.Resampling.BICUBIC)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def center_crop_arr(image: Image.Image, size: int) -> NDArray[np.uint8]:
    """ADM's preprocessing: :func:`resize_short_side` to ``size``, then a centre size × size
    crop (uint8 [size, size, 3])."""
    arr = resize_short_side(image, size)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def random_crop_arr(
    image: Image.Image, size: int, rng: np.random.Generator, min_frac: float = 0.8
) -> NDArray[np.uint8]:
    """ADM's ``random_crop_arr``: short side -> uniform integer in [⌈s/1⌉, ⌈s/0.8⌉] (BOX
    halvings, then BICUBIC), then a uniform ``size`` × ``size`` crop."""
    lo, hi = math.ceil(size / 1.0), math.ceil(size / min_frac)
    short = int(rng.integers(lo, hi + 1))
    arr = resize_short_side(image, short)
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    return arr[top : top + size, left : left + size]


def to_uint8_nhwc(x: torch.Tensor) -> NDArray[np.uint8]:
    """ADM's quantisation of [-1, 1] NCHW samples: ((x + 1)·127.5).clamp(0, 255), truncated."""
    q = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return q.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8_nhwc(images: NDArray[np.uint8]) -> torch.Tensor:
    """uint8 NHWC images as float32 NCHW in [-1, 1] (x/127.5 − 1)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


# -- npz internals ------------------------------------------------------------------------------


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


def _stored_offset(path: Path, member: str) -> int | None:
    """Byte offset of ``member``'s array data in the npz file when the zip stores it
    uncompressed (``np.savez``), else None (``np.savez_compressed``: no random access)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            # Local file header: 30 fixed bytes, then the name and the extra field, whose
            # lengths are at bytes 26 and 28 (they may differ from the central directory's).
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                return None
            start = info.header_offset + 30
            start += int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            f.seek(start)
            _npy_header(f, f"{path}['{member[:-4]}']")
            return f.tell()


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


# -- the image source ---------------------------------------------------------------------------


@dataclass(eq=False)
class ImageSource:
    """Images on disk or in memory: an ADM ``.npz`` (``arr_0``, labels ``arr_1``), a folder of
    image files (labels: the sorted class subfolders' indices), or uint8 arrays.

    ``size`` is (H, W) of every image: checked when the source is opened, or, for a folder
    opened with ``image_size``, the centre crop ``crop`` × ``crop`` ADM prepares ImageNet with
    (and, for a folder opened without size checks, the first image's size). ``classes``: the
    class folder names. Read in order with :meth:`batches`, at random with :meth:`raw`.
    """

    path: Path
    kind: SourceKind
    count: int
    size: tuple[int, int]
    labels: NDArray[np.int64] | None = None
    keys: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    crop: int | None = None
    classes: tuple[str, ...] | None = None
    fortran_order: bool = False
    description: str = ""
    _array: NDArray[np.uint8] | None = field(default=None, repr=False)
    _sha256: str | None = field(default=None, repr=False)
    # Training threads read at random: the array (memory map) is opened once, under the lock.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.description:
            what = {"npz": "npz file", "folder": "image folder", "arrays": "arrays"}[self.kind]
            self.description = f"{what} {self.path}"

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        """A human name for image ``index`` (for error messages)."""
        if self.kind == "folder":
            return str(self.files[index])
        if self.kind == "arrays":
            return f"{self.path}[{index}]"
        return f"{self.path}['arr_0'][{index}]"

    # -- content identity

    @property
    def sha256(self) -> str:
        """SHA-256 of the content, computed once: of the npz file's bytes; of each folder
        image's relative path, label and bytes; of the arrays' bytes and labels."""
        if self._sha256 is None:
            self._sha256 = self._content_sha256()
        return self._sha256

    def _content_sha256(self) -> str:
        if self.kind == "npz":
            return sha256_file(self.path)
        h = hashlib.sha256()
        if self.kind == "arrays":
            assert self._array is not None
            h.update(f"arrays|{list(self._array.shape)}\n".encode())
            h.update(np.ascontiguousarray(self._array).tobytes())
            if self.labels is not None:
                h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
            return h.hexdigest()
        with ThreadPoolExecutor(8) as pool:  # file reads overlap; hashlib releases the GIL
            digests = pool.map(sha256_file, self.files)
            for i, (p, d) in enumerate(zip(self.files, digests, strict=True)):
                label = "" if self.labels is None else int(self.labels[i])
                h.update(f"{p.relative_to(self.path).as_posix()}\t{label}\t{d}\n".encode())
        return h.hexdigest()

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data of a run: kind, count, image size, classes, content hash."""
        out: dict[str, Any] = {"kind": self.kind, "n": self.count, "size": list(self.size)}
        if self.classes is not None:
            out["classes"] = len(self.classes)
        out["sha256"] = self.sha256
        return out

    # -- random access

    def _arrays(self) -> NDArray[np.uint8]:
        if self._array is not None:
            return self._array
        with self._lock:
            if self._array is None:
                self._array = self._open_array()
        return self._array

    def _open_array(self) -> NDArray[np.uint8]:
        assert self.kind == "npz"
        h, w = self.size
        offset = None if self.fortran_order else _stored_offset(self.path, "arr_0.npy")
        if offset is not None:  # memory-mapped: pages are read when touched
            return np.memmap(self.path, np.uint8, "r", offset, (self.count, h, w, 3), order="C")
        with np.load(self.path, allow_pickle=False) as data:  # deflated or Fortran: loaded whole
            return np.ascontiguousarray(data["arr_0"])

    def raw(self, index: int) -> NDArray[np.uint8] | Image.Image:
        """Image ``index`` as stored: uint8 [H, W, 3] from an npz or arrays, the decoded RGB
        image (before any crop) from a folder."""
        if self.kind == "folder":
            return _open_rgb(self.files[index])
        return self._arrays()[index]

    def image(self, index: int) -> NDArray[np.uint8]:
        """Image ``index`` as uint8 [H, W, 3], centre-cropped to ``crop`` when set."""
        if self.kind != "folder":
            return np.asarray(self._arrays()[index])
        raw = self.raw(index)
        assert isinstance(raw, Image.Image)
        if self.crop is None:
            return np.asarray(raw, dtype=np.uint8)
        return center_crop_arr(raw, self.crop)

    # -- streaming

    def batches(self, batch_size: int, workers: int = 4) -> Iterator[NDArray[np.uint8]]:
        """uint8 NHWC batches in order, the next one read while the caller uses the current."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.kind == "npz":
            return _read_ahead(self._npz_batches(batch_size))
        if self.kind == "folder":
            return _read_ahead(self._folder_batches(batch_size, workers))
        arr = self._arrays()
        return (np.array(arr[s : s + batch_size]) for s in range(0, self.count, batch_size))

    def _npz_batches(self, batch_size: int) -> Iterator[NDArray[np.uint8]]:
        h, w = self.size
        if self.fortran_order:  # rare (saved from a transposed view): no row streaming
            arr = self._arrays()
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

    def _folder_batches(self, batch_size: int, workers: int) -> Iterator[NDArray[np.uint8]]:
        # PIL releases the GIL while decoding, so threads decode in parallel.
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for s in range(0, self.count, batch_size):
                idx = range(s, min(s + batch_size, self.count))
                images = list(pool.map(self.image, idx))
                for i, im in zip(idx, images, strict=True):
                    if im.shape[:2] != self.size:
                        raise ValueError(
                            f"{self.files[i]} is {im.shape[0]}x{im.shape[1]} but "
                            f"{self.files[0]} is {self.size[0]}x{self.size[1]}: a folder's "
                            "images must share one size"
                        )
                yield np.stack(images)


# -- opening ------------------------------------------------------------------------------------


def scan_class_folders(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """An ImageNet-style tree ``root/<class>/<image>``: (sorted class names, (file, label))."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected root/<class>/<image>)")
    samples = [(p, k) for k, c in enumerate(classes) for p in list_images(root / c)]
    if not samples:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return classes, samples


def _open_npz(path: Path, require_labels: bool) -> ImageSource:
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
    if require_labels and "arr_1" not in keys:
        raise ValueError(f"{path}: no 'arr_1' (labels, one integer per image of arr_0)")
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


def _header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return h, w


def _open_folder(
    path: Path, image_size: int | None, require_labels: bool, check_sizes: bool
) -> ImageSource:
    classes: list[str] | None = None
    if require_labels:
        classes, samples = scan_class_folders(path)
        files = [p for p, _ in samples]
        labels: NDArray[np.int64] | None = np.array([k for _, k in samples], dtype=np.int64)
    else:
        files = list_images(path)
        if not files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        labels = None
        if all(len(p.relative_to(path).parts) == 2 for p in files):
            # root/<class>/<image>: labels are the sorted class folders' indices (ADM's).
            classes, samples = scan_class_folders(path)
            files = [p for p, _ in samples]
            labels = np.array([k for _, k in samples], dtype=np.int64)
    if image_size is not None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        size = (image_size, image_size)
    else:
        size = _header_size(files[0])
        for p in files[1:] if check_sizes else ():
            if (s := _header_size(p)) != size:
                raise ValueError(
                    f"{path}: images of different sizes ({files[0].name} is {size[0]}x{size[1]}, "
                    f"{p.relative_to(path)} is {s[0]}x{s[1]}); resize them first, or centre-crop "
                    "them ADM-style (--image-size N)"
                )
    return ImageSource(
        path,
        "folder",
        len(files),
        size,
        labels,
        files=tuple(files),
        crop=image_size,
        classes=None if classes is None else tuple(classes),
    )


def open_images(
    path: str | os.PathLike[str],
    image_size: int | None = None,
    *,
    require_labels: bool = False,
    check_sizes: bool = True,
    warn: Callable[[str], None] | None = None,
) -> ImageSource:
    """Open an ADM ``.npz`` batch, an image folder, or an ``fguide sample`` run folder.

    Checks cheap things up front, so that a long job does not fail at its end: the npz keys,
    ``arr_0``'s dtype and shape (from the array header: no pixels are read), ``arr_1``'s length
    and integer type; for a folder (searched recursively; class subfolders give labels), that
    every image is readable and (unless ``image_size`` crops them, or ``check_sizes`` is off)
    of one size. ``image_size`` applies to folders only. ``require_labels``: labels are needed
    (an npz must have ``arr_1``, a folder must be ``root/<class>/<image>``).

    A run folder (it has ``manifest.json``) opens its ``samples.npz`` (also when named as a
    file), refused unless its SHA-256 is the one the manifest records (hashed once: the
    source's :attr:`ImageSource.sha256`); ``warn`` (default: a ``UserWarning``) is told when
    the manifest does not say the run is complete, and a run without ``samples.npz`` is an
    error (its ``grid.png`` is not a sample batch). The folder of another fguide job (a
    fine-tuning run's plots, say) is refused, naming what it is.
    """
    from fguide.io import folders, runs

    p = Path(path)
    if p.is_dir():
        if runs.is_run_folder(p):
            return _open_run(p, runs.read_run(p), require_labels, warn)
        kind = folders.folder_kind(p)
        if kind is not None and kind != runs.KIND:
            raise ValueError(
                f"{p} is a fguide {folders.kind_label(kind)} folder, not a sample run or image "
                "folder"
            )
        if (p / runs.SAMPLES).is_file():  # a run folder whose manifest is gone: not grid.png
            _warn(
                warn,
                f"{p}: holds {runs.SAMPLES} but no {runs.MANIFEST}: reading {runs.SAMPLES} "
                "without knowing whether its run completed",
            )
            return _open_npz(p / runs.SAMPLES, require_labels)
        return _open_folder(p, image_size, require_labels, check_sizes)
    if not p.exists():
        raise FileNotFoundError(f"not found: {p} (no such file or folder)")
    if p.name == runs.SAMPLES and runs.is_run_folder(p.parent):
        return _open_run(p.parent, runs.read_run(p.parent), require_labels, warn)
    return _open_npz(p, require_labels)


def _open_run(
    path: Path, run: RunInfo, require_labels: bool, warn: Callable[[str], None] | None
) -> ImageSource:
    if run.samples is None:
        raise ValueError(
            f"{path}: this fguide sample run has no samples.npz yet (status {run.status!r}); "
            "finish the run (rerun the same fguide sample command) first"
        )
    if run.status != "complete":
        msg = (
            f"{path}: the run's manifest says {run.status!r}, not 'complete': {run.samples.name} "
            "may be from an earlier, interrupted or different run"
        )
        _warn(warn, msg)
    from fguide.io.runs import check_samples

    src = _open_npz(run.samples, require_labels)
    check_samples(run, src.sha256)  # the source keeps the hash: its readers do not hash again
    return src


def _warn(warn: Callable[[str], None] | None, msg: str) -> None:
    if warn is not None:
        warn(msg)
    else:
        warnings.warn(msg, UserWarning, stacklevel=4)


def from_arrays(
    images: NDArray[np.uint8], labels: Any = None, description: str = "arrays"
) -> ImageSource:
    """An :class:`ImageSource` over in-memory uint8 [N, H, W, 3] images (labels optional)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}"
        )
    y = None
    if labels is not None:
        raw = np.asarray(labels).reshape(-1)
        if raw.size and not np.issubdtype(raw.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {raw.dtype}")
        y = raw.astype(np.int64)
        if len(y) != len(images):
            raise ValueError(f"{len(images)} images but {len(y)} labels")
    return ImageSource(
        Path(description),
        "arrays",
        int(images.shape[0]),
        (int(images.shape[1]), int(images.shape[2])),
        y,
        description=description,
        _array=images,
    )
