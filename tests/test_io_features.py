"""The Inception feature cache (fguide.io.features): keys, checksums, recomputation.

The features themselves are tested in test_evaluation_quality.py (against the Inception run
directly); here the extractor is replaced by a counter that returns known features, so that
what is under test is only the cache: which file a key maps to, what makes a file invalid, and
that an invalid file is recomputed rather than trusted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fguide.io.features as features
from fguide.io.features import LOGITS_DIM, POOL_DIM, SPATIAL_DIM, BatchFeatures, cached_features
from fguide.io.images import ImageSource, from_arrays
from fguide.metrics.fid import FeatureStats

N = 5


def _known_features(seed: int) -> BatchFeatures:
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((N, POOL_DIM)).astype(np.float32)
    spatial = rng.standard_normal((N, SPATIAL_DIM)).astype(np.float32)
    logits = rng.standard_normal((N, LOGITS_DIM)).astype(np.float32)
    return BatchFeatures(
        pool, logits, FeatureStats(POOL_DIM).update(pool), FeatureStats(SPATIAL_DIM).update(spatial)
    )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the Inception pass: every call is counted and returns the seed-1 features."""
    made: list[int] = []

    def fake(source: ImageSource, model: Any, **kwargs: Any) -> BatchFeatures:
        made.append(source.count)
        return _known_features(1)

    monkeypatch.setattr(features, "extract_features", fake)
    return made


KEY = {"file_sha256": "a" * 64, "weights_sha256": "b" * 64}


def _run(cache: Path, **key: str) -> Any:
    source = from_arrays(np.zeros((N, 4, 4, 3), np.uint8))
    model = torch.nn.Linear(1, 1)  # stands in for the Inception: dtype and device only
    return cached_features(source, model, cache_dir=cache, **{**KEY, **key})  # type: ignore[arg-type]


def _equal(a: BatchFeatures, b: BatchFeatures) -> None:
    np.testing.assert_array_equal(a.pool, b.pool)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.pool_stats.cov, b.pool_stats.cov)
    np.testing.assert_array_equal(a.spatial_stats.mean, b.spatial_stats.mean)


# Each cache file holds two float64 2048² scatter matrices (~66 MB): the tests write few.


def test_miss_hit_and_a_file_made_for_other_weights(tmp_path: Path, calls: list[int]) -> None:
    feats, status, path = _run(tmp_path)
    assert (status, calls) == ("miss", [N]) and path is not None and path.is_file()
    again, status2, path2 = _run(tmp_path)
    assert (status2, path2, calls) == ("hit", path, [N])  # not extracted a second time
    _equal(again, _known_features(1))
    # The file name holds the reference's and the weights' hashes ...
    other = features.feature_cache_path(tmp_path, "a" * 64, "c" * 64, torch.float32)
    assert other != path and other.parent == path.parent
    assert features.feature_cache_path(tmp_path, "d" * 64, "b" * 64, torch.float32) != path
    # ... and so does the meta: a file under the name of other weights (a renamed file, or a
    # collision of the shortened hashes) is recomputed, not trusted.
    path.rename(other)
    with pytest.warns(RuntimeWarning, match="weights_sha256"):
        feats, status, path3 = _run(tmp_path, weights_sha256="c" * 64)
    assert (status, path3, len(calls)) == ("recomputed", other, 2)


def _damaged(tmp_path: Path, edit: Any) -> Path:
    path = tmp_path / "cache.npz"
    feats = _known_features(1)
    features._save_cache(path, feats, {"cache_version": features.CACHE_VERSION, **KEY})
    features._load_cache(path, {"cache_version": features.CACHE_VERSION, **KEY})  # valid
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    edit(arrays)
    np.savez(path, **arrays)
    return path


def test_every_array_is_checksummed(tmp_path: Path) -> None:
    def change_one_feature(arrays: dict[str, np.ndarray]) -> None:
        arrays["pool"][2, 7] += 1.0  # a valid npz, valid meta, one changed number

    path = _damaged(tmp_path, change_one_feature)
    with pytest.raises(ValueError, match="checksum mismatch in 'pool'"):
        features._load_cache(path, KEY)


def test_meta_that_is_not_an_object_is_invalid(tmp_path: Path) -> None:
    def meta_list(arrays: dict[str, np.ndarray]) -> None:
        arrays["meta"] = np.array(json.dumps([1, 2, 3]))

    path = _damaged(tmp_path, meta_list)
    with pytest.raises(ValueError, match="not a JSON object"):
        features._load_cache(path, KEY)


def test_an_unwritable_cache_keeps_the_features(tmp_path: Path, calls: list[int]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="could not write the feature cache"):
        feats, status, path = _run(blocker / "cache")
    assert (status, path) == ("disabled", None)
    _equal(feats, _known_features(1))


def test_the_cache_is_bounded_least_recently_used_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import time

    now = time.time()
    files = {}
    for age, name in ((30, "old"), (20, "mid"), (10, "new"), (40, "kept")):
        key = f"{ord(name[0]):x}" * 32  # a file checksum, as the cache names its files
        f = features.feature_cache_path(tmp_path, key, "ab" * 32, torch.float32)
        f.write_bytes(b"x" * 100)
        os.utime(f, (now - age, now - age))
        files[name] = f
    left_over = tmp_path / f".{files['old'].name}.x1yz_3ab.tmp"  # a write cut short long ago
    in_flight = tmp_path / f".{files['mid'].name}.x2yz_3ab.tmp"  # another process's write
    # A user's files in a --cache-dir that only look like the cache's: never deleted.
    lookalike = tmp_path / "my-inception-features-v1.npz"
    temp_lookalike = tmp_path / ".my-inception-w-float32-v1.npz.x1.tmp"
    for f, age in ((left_over, 7200), (in_flight, 0), (lookalike, 9000), (temp_lookalike, 7200)):
        f.write_bytes(b"x" * 100)
        os.utime(f, (now - age, now - age))
    unrelated = tmp_path / "notes.npz"
    unrelated.write_bytes(b"x" * 1000)
    removed = features.prune_cache(tmp_path, 200, keep=files["kept"])
    # 400 bytes of cache files, bound 200: the two least recently used go, "kept" is exempt.
    assert set(removed) == {files["old"], files["mid"], left_over}
    assert files["new"].exists() and files["kept"].exists() and in_flight.exists()
    assert unrelated.exists() and lookalike.exists() and temp_lookalike.exists()
    monkeypatch.setenv(features.CACHE_MAX_ENV, "0.5")
    assert features.cache_limit_bytes() == 500_000_000
    monkeypatch.setenv(features.CACHE_MAX_ENV, "lots")
    with pytest.raises(ValueError, match="FGUIDE_CACHE_MAX_GB"):
        features.cache_limit_bytes()


def test_a_small_batch_is_cached_as_rows_with_the_same_statistics(tmp_path: Path) -> None:
    # Streaming statistics of batches of 2, 2, 1 (as extract_features folds them) against
    # the ones rebuilt from the cached rows: equal to the last bit, from a file of ~100 kB.
    rng = np.random.default_rng(3)
    pool = rng.standard_normal((N, POOL_DIM)).astype(np.float32)
    spatial = rng.standard_normal((N, SPATIAL_DIM)).astype(np.float32)
    logits = rng.standard_normal((N, LOGITS_DIM)).astype(np.float32)
    pool_stats, spatial_stats = FeatureStats(POOL_DIM), FeatureStats(SPATIAL_DIM)
    for s in (slice(0, 2), slice(2, 4), slice(4, 5)):
        pool_stats.update(pool[s])
        spatial_stats.update(spatial[s])
    feats = BatchFeatures(pool, logits, pool_stats, spatial_stats, spatial)
    key = {"cache_version": features.CACHE_VERSION, **KEY}
    path = tmp_path / "small.npz"
    features._save_cache(path, feats, key)
    assert path.stat().st_size < 200_000  # not two 2048² float64 matrices (66 MB)
    with np.load(path) as data:
        assert "spatial_scatter" not in data.files and "pool_scatter" not in data.files
    back = features._load_cache(path, key)
    for a, b in ((back.pool_stats, pool_stats), (back.spatial_stats, spatial_stats)):
        np.testing.assert_array_equal(a.mean, b.mean)
        np.testing.assert_array_equal(a.cov, b.cov)
    np.testing.assert_array_equal(back.spatial, spatial)
