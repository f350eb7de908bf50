"""Per-sample seed streams: every random draw in fguide is a function of named integers.

A draw is identified by (run seed, stream tag, index, ...): sample i's noise by (seed, i), its
label by (seed, i, ``LABELS``), a fine-tuning step's (t, ε) by (seed, ``FINETUNE_NOISE``,
step), and so on. Mixing goes through :class:`numpy.random.SeedSequence`, so distinct tuples
give independent streams (``(s, i + 1)`` and ``(s + 1, i)`` do not collide, as ``s + i`` would).
The tags are named here, once, so that two uses never share a stream by accident. (A quirk of
SeedSequence: trailing zeros do not change the stream, ``mix(s, i) == mix(s, i, 0)``; tags are
therefore non-zero and never last-and-zero.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Stream tags (the values are part of every run's identity: never change one).
LABELS = 0x4C41424C
"""Sample labels ("LABL"); ``balanced`` blocks add a trailing 1."""
HOLDOUT = 0x401D
"""The stratified held-out split of ``fguide finetune``."""
FINETUNE_ORDER, FINETUNE_AUGMENT, FINETUNE_NOISE, FINETUNE_STEP, FINETUNE_EVAL = 1, 2, 3, 4, 5
"""``fguide finetune``: data order, augmentation, (t, ε) draws, torch's global RNG per step,
held-out noise."""
DEMO_LABELS, DEMO_NOISE, DEMO_REFERENCE, DEMO_BASIS = 0xDE01, 0xDE02, 0xDE03, 0xDE04
"""``fguide demo`` (Gaussian mixture): target order, sampler noise, exact reference samples,
the embedding of the circle in d > 2."""
DIGITS_SPLIT, DIGITS_CALIB, DIGITS_BATCHES = 0xD161, 0xCA1B, 0xBA7C
"""``fguide demo --world digits``: the stratified split, the calibration-loss comparison's data,
training batches."""


def mix(*parts: int) -> int:
    """A 63-bit seed from integers; distinct tuples give independent streams: the two 32-bit
    words w0, w1 of ``SeedSequence(parts).generate_state(2, uint32)`` as (w0 << 31) ^ w1."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` in a run with ``seed``: ``mix(seed, index)``."""
    return mix(seed, index)


def generator(*parts: int) -> torch.Generator:
    """A CPU torch generator seeded by ``mix(*parts)``."""
    return torch.Generator().manual_seed(mix(*parts))


def numpy_rng(*parts: int) -> np.random.Generator:
    """A numpy generator on the stream (``parts``) (SeedSequence-mixed, as :func:`mix`)."""
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


class SampleNoise:
    """Per-sample Gaussian draws: row b comes from its own generator seeded by (seed, indices[b]).

    Draws are made on the CPU in float32 and moved to the target device and dtype, so a sample
    is identical whatever the batch it is in, and on CPU and GPU alike.
    """

    def __init__(self, seed: int, indices: Sequence[int]):
        self.indices = list(indices)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]

    def __call__(self, like: Tensor) -> Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(
                f"noise source has {len(self.generators)} samples, state has {like.shape[0]}"
            )
        draws = torch.stack([torch.randn(like.shape[1:], generator=g) for g in self.generators])
        if like.device.type == "cuda":  # pinned and asynchronous: no host sync per step
            draws = draws.pin_memory()
        return draws.to(device=like.device, dtype=like.dtype, non_blocking=True)

    def initial(
        self,
        shape: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """The start z of shape [B, *shape] (the first draw of every sample)."""
        return self(torch.empty(len(self.generators), *shape, device=device, dtype=dtype))
