"""fguide.finetune.data: the stratified, seeded held-out split; the augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fguide.finetune.data import load_one, split_holdout
from fguide.io.images import from_arrays, random_crop_arr


def test_stratified_seeded_holdout() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, held = split_holdout(labels, 0.2, seed=3)
    assert len(held) == 20 and len(train) == 80
    assert np.bincount(labels[held], minlength=4).tolist() == [10, 6, 3, 1]
    assert set(train.tolist()).isdisjoint(held.tolist())
    assert np.array_equal(held, split_holdout(labels, 0.2, seed=3)[1])
    assert not np.array_equal(held, split_holdout(labels, 0.2, seed=4)[1])
    assert len(split_holdout(labels, 7, seed=0)[1]) == 7
    with pytest.raises(ValueError, match="holdout"):
        split_holdout(labels, 100, seed=0)


def test_augmentation_flips_left_right_half_the_time() -> None:
    """ADM's augmentation: a random crop, then with probability ½ (the generator's next
    uniform draw < ½) a mirror image: columns reversed, rows kept."""
    image = np.random.default_rng(0).integers(0, 256, (1, 10, 12, 3), dtype=np.uint8)
    source = from_arrays(image, np.zeros(1, dtype=np.int64))
    flips = []
    for seed in range(8):
        expected_rng = np.random.default_rng(seed)
        crop = random_crop_arr(Image.fromarray(image[0]), 8, expected_rng)
        flip = bool(expected_rng.random() < 0.5)
        flips.append(flip)
        got = load_one(source, 0, 8, np.random.default_rng(seed))
        assert np.array_equal(got, crop[:, ::-1] if flip else crop), seed
        assert not np.array_equal(crop[:, ::-1], crop[::-1])  # the two flips differ here
    assert any(flips) and not all(flips)
