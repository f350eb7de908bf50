"""fguide.finetune_data: the stratified, seeded held-out split."""

from __future__ import annotations

import numpy as np
import pytest

from fguide.finetune_data import split_holdout


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
