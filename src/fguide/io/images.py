"""Image files: folders (flat or ImageNet-style class subfolders) and ADM ``.npz`` batches.

Conventions (DESIGN.md): uint8 NHWC RGB at the file boundary; the library works on NCHW
tensors in [-1, 1]. Labels of a class-subfolder tree are the indices of the sorted folder names,
which is how ADM numbers ImageNet's 1000 synsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by suffix, case-insensitive), in sorted order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | Path) -> NDArray[np.uint8]:
    """An image file as uint8 RGB [H, W, 3]; a clear error names an unreadable file."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


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


@dataclass
class ImageFolder:
    """An ImageNet-style tree ``root/<class>/<image>``: labels = index of the sorted class name."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]

    @classmethod
    def scan(cls, root: str | Path) -> ImageFolder:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{root}: no class subfolders (expected root/<class>/<image>)")
        samples = [(p, k) for k, c in enumerate(classes) for p in list_images(root / c)]
        if not samples:
            raise ValueError(
                f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders"
            )
        return cls(root, classes, samples)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, size: int | None = None) -> tuple[NDArray[np.uint8], int]:
        """Image ``index`` (centre-cropped to ``size`` as ADM does, when given) and its label."""
        path, label = self.samples[index]
        if size is None:
            return load_image(path), label
        try:
            with Image.open(path) as im:
                return center_crop_arr(im.convert("RGB"), size), label
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None


def load_npz_images(
    path: str | Path, require_labels: bool = False
) -> tuple[NDArray[np.uint8], NDArray[np.int64] | None]:
    """An ADM batch: ``arr_0`` uint8 [N, H, W, 3] and, when present, ``arr_1`` labels [N]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path}: no 'arr_0' (images) in the file; keys are {data.files}")
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{path}: 'arr_0' must be uint8 [N, H, W, 3] (ADM's layout); "
            f"got {images.dtype} {list(images.shape)}"
        )
    if labels is None and require_labels:
        raise ValueError(f"{path}: no 'arr_1' (labels) in the file")
    if labels is not None:
        labels = labels.astype(np.int64).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_uint8_nhwc(x: torch.Tensor) -> NDArray[np.uint8]:
    """ADM's quantisation of [-1, 1] NCHW samples: ((x + 1)·127.5).clamp(0, 255), truncated."""
    q = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return q.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8_nhwc(images: NDArray[np.uint8]) -> torch.Tensor:
    """uint8 NHWC images as float32 NCHW in [-1, 1] (x/127.5 − 1)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
