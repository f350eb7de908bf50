"""Seed streams: distinct tuples give distinct streams; draws depend only on (seed, index)."""

from __future__ import annotations

import numpy as np
import torch

from fguide import rng
from fguide.sampling import sample_labels


def test_neighbouring_seed_index_pairs_do_not_collide() -> None:
    # With seed + index mixing, (s, i + 1) and (s + 1, i) would share a stream.
    seeds = {(s, i): rng.sample_seed(s, i) for s in range(20) for i in range(20)}
    assert len(set(seeds.values())) == len(seeds)
    a = rng.SampleNoise(3, [5]).initial((4,))
    b = rng.SampleNoise(4, [4]).initial((4,))
    assert not torch.equal(a, b)
    assert rng.mix(1, 2) != rng.mix(2, 1) and rng.mix(1, 2) != rng.mix(1, 2, 1)


def test_sample_noise_rows_do_not_depend_on_the_batch() -> None:
    together = rng.SampleNoise(7, [0, 1, 2]).initial((2, 3))
    alone = rng.SampleNoise(7, [1]).initial((2, 3))
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])


def test_uniform_labels_are_uniform_and_depend_on_the_index() -> None:
    labels = sample_labels("uniform", 0, range(5000), 10)
    assert labels is not None
    counts = np.bincount(labels, minlength=10)
    # χ² with 9 degrees of freedom: P(χ² > 27.9) = 0.001
    chi2 = float(((counts - 500.0) ** 2 / 500.0).sum())
    assert chi2 < 27.9, counts
    assert len(set(labels[:50].tolist())) > 5  # not one label for every sample


def test_streams_differ_by_tag() -> None:
    a = rng.numpy_rng(0, 1, rng.LABELS).integers(1 << 30, size=4)
    b = rng.numpy_rng(0, 1, rng.HOLDOUT).integers(1 << 30, size=4)
    assert not np.array_equal(a, b)
    g1, g2 = rng.generator(0, rng.FINETUNE_NOISE, 3), rng.generator(0, rng.FINETUNE_NOISE, 4)
    assert not torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))
