"""The one image source (fguide.io.images): npz, folders, arrays, run folders, fingerprints.

Every expected value is the data the test wrote (the images, the labels), read back through
numpy or PIL directly, not through the source under test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fguide.io import runs
from fguide.io.files import sha256_file
from fguide.io.images import from_arrays, open_images, random_crop_arr

N, H, W = 6, 5, 7


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N, H, W, 3), dtype=np.uint8)


def _class_folder(root: Path, images: np.ndarray, labels: list[int]) -> Path:
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        (root / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / f"c{y}" / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_and_random_access_equal_arr_0(
    tmp_path: Path, images: np.ndarray, compressed: bool
) -> None:
    path = tmp_path / "b.npz"
    (np.savez_compressed if compressed else np.savez)(path, images, np.arange(N) % 3)
    src = open_images(path)
    assert (src.kind, src.count, src.size, src.keys) == ("npz", N, (H, W), ("arr_0", "arr_1"))
    np.testing.assert_array_equal(src.labels, np.arange(N) % 3)
    batches = list(src.batches(4))
    assert [len(b) for b in batches] == [4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    for i in (5, 0, 3):
        np.testing.assert_array_equal(np.asarray(src.raw(i)), images[i])
    # np.savez stores the member: it is memory-mapped, not loaded; a deflated one is loaded.
    assert isinstance(src._array, np.memmap) == (not compressed)


def test_npz_errors_name_the_file_and_key(tmp_path: Path, images: np.ndarray) -> None:
    np.savez(tmp_path / "float.npz", images.astype(np.float32))
    with pytest.raises(ValueError, match=r"float\.npz\['arr_0'\] must be uint8"):
        open_images(tmp_path / "float.npz")
    np.savez(tmp_path / "labels.npz", images, np.arange(N + 1))
    with pytest.raises(ValueError, match=rf"labels\.npz\['arr_1'\] must hold {N}"):
        open_images(tmp_path / "labels.npz")
    # Float labels are refused, not truncated (fine-tuning and evaluation read them alike).
    np.savez(tmp_path / "flabels.npz", images, np.linspace(0, 2.5, N))
    with pytest.raises(ValueError, match="integer labels"):
        open_images(tmp_path / "flabels.npz", require_labels=True)
    np.savez(tmp_path / "nolabels.npz", images)
    assert open_images(tmp_path / "nolabels.npz").labels is None
    with pytest.raises(ValueError, match="no 'arr_1'"):
        open_images(tmp_path / "nolabels.npz", require_labels=True)
    (tmp_path / "notzip.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not an .npz file"):
        open_images(tmp_path / "notzip.npz")
    with pytest.raises(FileNotFoundError, match="not found"):
        open_images(tmp_path / "missing.npz")


def test_class_folders_give_sorted_labels(tmp_path: Path, images: np.ndarray) -> None:
    labels = [2, 0, 1, 0, 2, 1]
    root = _class_folder(tmp_path / "tree", images, labels)
    src = open_images(root, require_labels=True)
    assert src.kind == "folder" and src.classes == ("c0", "c1", "c2")
    # Order: class by class (sorted names), files sorted inside a class.
    order = sorted(range(N), key=lambda i: (labels[i], i))
    np.testing.assert_array_equal(src.labels, [labels[i] for i in order])
    np.testing.assert_array_equal(np.concatenate(list(src.batches(4))), images[order])
    raw = src.raw(2)
    assert isinstance(raw, Image.Image)
    np.testing.assert_array_equal(np.asarray(raw), images[order[2]])
    # A flat folder has no labels; training needs class subfolders.
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(images[0]).save(flat / "a.png")
    assert open_images(flat).labels is None
    with pytest.raises(ValueError, match="no class subfolders"):
        open_images(flat, require_labels=True)


def test_folder_with_mixed_sizes(tmp_path: Path, images: np.ndarray) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "b.jpg")
    with pytest.raises(ValueError, match=r"different sizes .*b\.jpg is 20x24"):
        open_images(folder)
    # ADM-style centre crop makes them one size; training crops every image itself.
    src = open_images(folder, image_size=4)
    assert [b.shape for b in src.batches(8)] == [(2, 4, 4, 3)]
    assert open_images(folder, check_sizes=False).count == 2


def test_fingerprint_covers_the_content(tmp_path: Path, images: np.ndarray) -> None:
    labels = np.arange(N) % 3
    np.savez(tmp_path / "a.npz", images, labels)
    changed = images.copy()
    changed[4, 2, 3, 1] ^= 1  # one pixel, same shape and labels
    np.savez(tmp_path / "b.npz", changed, labels)
    a, b = open_images(tmp_path / "a.npz"), open_images(tmp_path / "b.npz")
    assert a.fingerprint()["sha256"] != b.fingerprint()["sha256"]
    assert {k: v for k, v in a.fingerprint().items() if k != "sha256"} == {
        k: v for k, v in b.fingerprint().items() if k != "sha256"
    }
    assert open_images(tmp_path / "a.npz").sha256 == a.sha256  # a function of the bytes
    arr = from_arrays(images, labels)
    assert from_arrays(images.copy(), labels).sha256 == arr.sha256
    assert from_arrays(changed, labels).sha256 != arr.sha256
    assert from_arrays(images, (labels + 1) % 3).sha256 != arr.sha256
    # Folders: one pixel of one file, or a label (the file moved to another class).
    tree = [0, 1, 2, 0, 1, 2]
    fa = _class_folder(tmp_path / "fa", images, tree)
    fb = _class_folder(tmp_path / "fb", changed, tree)
    fc = _class_folder(tmp_path / "fc", images, [1, 1, 2, 0, 1, 2])
    sa = open_images(fa, require_labels=True).sha256
    assert open_images(fb, require_labels=True).sha256 != sa
    assert open_images(fc, require_labels=True).sha256 != sa
    assert open_images(_class_folder(tmp_path / "fd", images, tree)).sha256 == sa


def test_from_arrays_checks_its_input(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        from_arrays(images.astype(np.float32))
    with pytest.raises(ValueError, match="labels must be integers"):
        from_arrays(images, np.zeros(N))
    with pytest.raises(ValueError, match=f"{N} images but {N - 1} labels"):
        from_arrays(images, np.arange(N - 1))
    src = from_arrays(images, np.arange(N))
    np.testing.assert_array_equal(np.concatenate(list(src.batches(4))), images)
    np.testing.assert_array_equal(src.raw(3), images[3])


def _run_folder(root: Path, images: np.ndarray, status: str | None, samples: bool) -> Path:
    root.mkdir()
    Image.fromarray(images[0]).save(root / runs.GRID)
    if samples:
        np.savez(root / runs.SAMPLES, images, np.arange(N))
    manifest: dict[str, Any] = {"format": runs.FORMAT, "status": status}
    if samples and status == "complete":  # a complete run records its samples' checksum
        manifest["samples"] = {"sha256": sha256_file(root / runs.SAMPLES)}
    if status is not None:
        (root / runs.MANIFEST).write_text(json.dumps(manifest))
    return root


def test_run_folders_mean_samples_npz(tmp_path: Path, images: np.ndarray) -> None:
    done = _run_folder(tmp_path / "done", images, "complete", samples=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete run: no warning
        src = open_images(done)
    assert (src.kind, src.path, src.count) == ("npz", done / runs.SAMPLES, N)

    running = _run_folder(tmp_path / "running", images, "running", samples=True)
    told: list[str] = []
    src = open_images(running, warn=told.append)
    assert src.path == running / runs.SAMPLES
    assert len(told) == 1 and "'running'" in told[0] and "not 'complete'" in told[0]

    # A run without samples.npz is an error, never its grid.png read as a one-image folder.
    empty = _run_folder(tmp_path / "empty", images, "running", samples=False)
    with pytest.raises(ValueError, match="no samples.npz"):
        open_images(empty)

    # samples.npz without a manifest: read, with a warning that nothing says it is complete.
    bare = _run_folder(tmp_path / "bare", images, None, samples=True)
    with pytest.warns(UserWarning, match="no manifest.json"):
        src = open_images(bare)
    assert src.path == bare / runs.SAMPLES


def test_adm_random_crop_and_flip() -> None:
    image = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    rng = np.random.default_rng(0)
    crops = [random_crop_arr(image, 16, rng) for _ in range(20)]
    assert all(c.shape == (16, 16, 3) and c.dtype == np.uint8 for c in crops)
    assert len({c.tobytes() for c in crops}) > 5  # random scales and offsets
    a = random_crop_arr(image, 16, np.random.default_rng(7))
    assert np.array_equal(a, random_crop_arr(image, 16, np.random.default_rng(7)))
