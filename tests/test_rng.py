"""Seed streams: distinct tuples give distinct streams; draws depend only on (seed, index)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
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


# -- pinned streams: computed here from numpy's and torch's definitions, not by fguide.rng ------


def _seed63(*parts: int) -> int:
    """rng.mix's documented construction: the two 32-bit words w0, w1 that
    SeedSequence(parts) generates, combined as (w0 << 31) ^ w1."""
    w0, w1 = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
    return (int(w0) << 31) ^ int(w1)


def _numpy_draws(*parts: int) -> list[int]:
    gen = np.random.default_rng(np.random.SeedSequence(list(parts)))
    return gen.integers(1 << 62, size=3).tolist()


def _torch_draws(seed: int) -> torch.Tensor:
    return torch.randn(3, generator=torch.Generator().manual_seed(seed))


# Every named stream: its tag's value (literal, as released: changing one changes every run
# that uses it), whether a numpy generator or a torch one reads it, and the parts its users
# give (a seed of 11, then the index, step, epoch or class where there is one, in their order).
STREAMS: dict[str, tuple[int, str, Callable[[int], tuple[int, ...]]]] = {
    "LABELS": (0x4C41424C, "numpy", lambda tag: (11, 5, tag)),
    "HOLDOUT": (0x401D, "numpy", lambda tag: (11, tag)),
    "FINETUNE_ORDER": (1, "numpy", lambda tag: (11, tag, 2)),
    "FINETUNE_AUGMENT": (2, "numpy", lambda tag: (11, tag, 7, 3)),
    "FINETUNE_NOISE": (3, "torch", lambda tag: (11, tag, 7)),
    "FINETUNE_STEP": (4, "torch", lambda tag: (11, tag, 7)),
    "FINETUNE_EVAL": (5, "torch", lambda tag: (11, tag, 9)),
    "DEMO_LABELS": (0xDE01, "torch", lambda tag: (11, tag)),
    "DEMO_NOISE": (0xDE02, "torch", lambda tag: (11, tag)),
    "DEMO_REFERENCE": (0xDE03, "torch", lambda tag: (11, tag)),
    "DEMO_BASIS": (0xDE04, "torch", lambda tag: (11, tag)),
    "DIGITS_SPLIT": (0xD161, "numpy", lambda tag: (11, 4, tag)),
    "DIGITS_CALIB": (0xCA1B, "numpy", lambda tag: (11, tag)),
    "DIGITS_BATCHES": (0xBA7C, "numpy", lambda tag: (11, 6, tag)),
}


def test_every_named_stream_is_pinned() -> None:
    named = {k for k, v in vars(rng).items() if k.isupper() and isinstance(v, int)}
    assert named == set(STREAMS)  # a new stream gets a row above


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_first_values_are_pinned(name: str) -> None:
    tag, kind, parts = STREAMS[name]
    assert getattr(rng, name) == tag
    ours, pinned = parts(getattr(rng, name)), parts(tag)
    assert rng.mix(*ours) == _seed63(*pinned)
    if kind == "numpy":
        assert rng.numpy_rng(*ours).integers(1 << 62, size=3).tolist() == _numpy_draws(*pinned)
    else:
        ours_draws = torch.randn(3, generator=rng.generator(*ours))
        assert torch.equal(ours_draws, _torch_draws(_seed63(*pinned)))


def test_sample_noise_and_labels_are_pinned() -> None:
    """Sample i's noise: a torch generator seeded by the 63-bit mix of (seed, i); its label:
    numpy's generator on SeedSequence([seed, i, 0x4C41424C]) (never the noise's seed: a zero
    tag would give SeedSequence([seed, i]), the same stream), balanced blocks b on
    SeedSequence([seed, b, 0x4C41424C, 1])."""
    seed, indices = 11, [0, 5, 123456789]
    noise = rng.SampleNoise(seed, indices).initial((3,))
    for row, i in zip(noise, indices, strict=True):
        assert torch.equal(row, _torch_draws(_seed63(seed, i)))
    labels = sample_labels("uniform", seed, indices, 1000)
    assert labels is not None
    assert labels.tolist() == [
        int(np.random.default_rng(np.random.SeedSequence([seed, i, 0x4C41424C])).integers(1000))
        for i in indices
    ]
    balanced = sample_labels("balanced", seed, range(20), 10)
    assert balanced is not None
    blocks = [
        np.random.default_rng(np.random.SeedSequence([seed, b, 0x4C41424C, 1])).permutation(10)
        for b in range(2)
    ]
    assert balanced.tolist() == np.concatenate(blocks).tolist()
