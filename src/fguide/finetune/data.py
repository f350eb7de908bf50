"""The data side of ``fguide finetune``: held-out split, ADM's augmentation, seeded batches.

Every draw is a function of named integers (:mod:`fguide.rng`): the held-out split of
(seed, ``HOLDOUT``), the data order of epoch e of (seed, ``FINETUNE_ORDER``, e), and the crop
and flip of position j of step k of (seed, ``FINETUNE_AUGMENT``, k, j). So step k's batch is a
function of (seed, k) alone, and a resumed run sees the batches an uninterrupted run sees.

Images are ADM's: training images get ADM's classifier augmentation
(:func:`~fguide.io.images.random_crop_arr`, then a horizontal flip with probability 1/2);
held-out images get ADM's centre crop. Pixels map to [−1, 1] as x/127.5 − 1.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from torch import Tensor

from fguide import rng as streams
from fguide.io.images import ImageSource, center_crop_arr, from_uint8_nhwc, random_crop_arr
from fguide.params import ParamError

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "TrainLoader",
    "check_labels",
    "default_image_size",
    "labels_of",
    "load_one",
    "split_holdout",
]

DEFAULT_IMAGE_SIZE = 128
"""The paper's and EluCD's resolution: the image size when neither the classifier (an ADM
preset) nor the data (square arrays) fixes one."""


def labels_of(source: ImageSource) -> NDArray[np.int64]:
    """The source's labels; a clear error when it has none."""
    if source.labels is None:
        raise ParamError(
            "{0}: {what} has no labels (an npz needs 'arr_1'; a folder needs class subfolders "
            "root/<class>/<image>)",
            "data",
            what=source.description,
        )
    return source.labels


def default_image_size(source: ImageSource) -> int:
    """The size of square npz or array images, else :data:`DEFAULT_IMAGE_SIZE`."""
    h, w = source.size
    if source.kind != "folder" and h == w:
        return int(h)
    return DEFAULT_IMAGE_SIZE


def _as_pil(raw: NDArray[np.uint8] | Image.Image) -> Image.Image:
    return raw if isinstance(raw, Image.Image) else Image.fromarray(np.asarray(raw))


def load_one(
    source: ImageSource, index: int, size: int, rng: np.random.Generator | None
) -> NDArray[np.uint8]:
    """Image ``index`` as uint8 [size, size, 3]: ADM's augmentation with ``rng``, else its
    centre crop."""
    raw = source.raw(index)
    if rng is None:
        if isinstance(raw, np.ndarray) and raw.shape[:2] == (size, size):
            return raw  # centre crop of an image already at size: the identity
        return center_crop_arr(_as_pil(raw), size)
    arr = random_crop_arr(_as_pil(raw), size, rng)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr


def split_holdout(
    labels: NDArray[np.int64], holdout: float | int, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train indices, held-out indices), stratified by class, seeded, both sorted.

    ``holdout`` is a fraction in (0, 1) (h = round(fraction · n), at least 1) or a count. The h
    held-out places are shared among classes in proportion to their sizes (largest
    remainder, ties to the lower class index), each class's picks drawn at random.
    """
    n = len(labels)
    if isinstance(holdout, float):
        h = max(1, round(holdout * n))
    else:
        h = int(holdout)
    if not 1 <= h < n:
        raise ParamError(
            "{0}: {v!r} keeps {h} of {n} samples; need at least 1 held-out and 1 training sample",
            "holdout",
            v=holdout,
            h=h,
            n=n,
        )
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * h / n
    take = np.floor(quota).astype(np.int64)
    rest = h - int(take.sum())
    order = np.lexsort((classes, -(quota - take)))  # largest remainder, then lower class
    take[order[:rest]] += 1
    rng = streams.numpy_rng(seed, streams.HOLDOUT)
    held: list[NDArray[np.int64]] = []
    for c, k in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == c)
        held.append(rng.permutation(members)[:k])
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).astype(np.int64), held_idx


class TrainLoader:
    """Batches of the training stream and the held-out set, loaded by a thread pool.

    The training stream concatenates seeded per-epoch permutations of the training indices;
    step k takes positions kB … kB + B − 1, so the data order is a function of (seed, k).
    """

    def __init__(
        self,
        source: ImageSource,
        train_idx: NDArray[np.int64],
        size: int,
        seed: int,
        augment: bool,
        batch_size: int,
        workers: int,
    ) -> None:
        self.source, self.train_idx, self.size, self.seed = source, train_idx, size, seed
        self.labels = labels_of(source)
        self.augment, self.batch_size = augment, batch_size
        self.pool = cf.ThreadPoolExecutor(workers) if workers > 0 else None
        self.prefetch = cf.ThreadPoolExecutor(1) if workers > 0 else None
        self._perms: dict[int, NDArray[np.int64]] = {}
        self._pending: tuple[int, cf.Future[tuple[Tensor, Tensor]]] | None = None

    def close(self) -> None:
        for ex in (self.prefetch, self.pool):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)

    def _perm(self, epoch: int) -> NDArray[np.int64]:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            rng = streams.numpy_rng(self.seed, streams.FINETUNE_ORDER, epoch)
            self._perms[epoch] = self.train_idx[rng.permutation(len(self.train_idx))]
        return self._perms[epoch]

    def step_indices(self, step: int) -> NDArray[np.int64]:
        n = len(self.train_idx)
        pos = step * self.batch_size + np.arange(self.batch_size)
        return np.array([self._perm(int(p // n))[p % n] for p in pos], dtype=np.int64)

    def _map(self, fn: Callable[[int], NDArray[np.uint8]], n: int) -> list[NDArray[np.uint8]]:
        if self.pool is None:
            return [fn(j) for j in range(n)]
        return list(self.pool.map(fn, range(n)))

    def load(
        self, indices: Sequence[int], rngs: Sequence[np.random.Generator | None]
    ) -> tuple[Tensor, Tensor]:
        imgs = self._map(
            lambda j: load_one(self.source, int(indices[j]), self.size, rngs[j]), len(indices)
        )
        x = from_uint8_nhwc(np.stack(imgs))
        y = torch.from_numpy(self.labels[np.asarray(indices, dtype=np.int64)])
        return x.contiguous(), y

    def _train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.step_indices(step)
        rngs = [
            streams.numpy_rng(self.seed, streams.FINETUNE_AUGMENT, step, j)
            if self.augment
            else None
            for j in range(len(idx))
        ]
        return self.load(idx.tolist(), rngs)

    def train_batch(self, step: int, prefetch_next: bool = True) -> tuple[Tensor, Tensor]:
        """Step ``step``'s batch (x0 in [−1, 1] NCHW, labels); loads step + 1 meanwhile."""
        if self._pending is not None and self._pending[0] == step:
            batch = self._pending[1].result()
        else:
            batch = self._train_batch(step)
        self._pending = None
        if self.prefetch is not None and prefetch_next:
            self._pending = (step + 1, self.prefetch.submit(self._train_batch, step + 1))
        return batch


def check_labels(source: ImageSource, num_classes: int, spec: str) -> None:
    if source.classes is not None and len(source.classes) != num_classes:
        raise ParamError(
            "{0}: {what} has {k} class folders but the {1} {spec!r} outputs {n} classes (labels "
            "are the sorted folder names' indices, so the folder must hold every class)",
            *("data", "classifier"),
            what=source.description,
            k=len(source.classes),
            spec=spec,
            n=num_classes,
        )
    labels = labels_of(source)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ParamError(
            "{0}: {what}: label {y} of sample {i} is outside [0, {n}) for the {1} {spec!r} "
            "({count} such labels)",
            *("data", "classifier"),
            what=source.description,
            y=int(labels[i]),
            i=i,
            n=num_classes,
            spec=spec,
            count=int(bad.sum()),
        )
